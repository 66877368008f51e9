"""``sd-plugin calibrate``: early-exit thresholds chosen on labelled held-out images, written as an ExitPolicy JSON.

Every exit's logits are collected once (:func:`sd_plugin.deploy.collect_exit_logits`), then
:func:`sd_plugin.deploy.calibrate` picks the thresholds for the target. The file loads with
``ExitPolicy.load`` and drives ``EarlyExitModel``, MMPretrain's ``early_exit=dict(policy=...)`` and
``sd-plugin export --policy``.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
import torch.nn as nn

from ..deploy.calibrate import DEFAULT_DELTA, METHODS
from ..deploy.policy import CRITERIA
from ._data import add_data_args, batches, data_spec, keep_images, progress
from ._load import add_model_args, add_progress_arg, load_model, plain_doc

__all__ = ["add_parser", "run", "calibrate_options", "count_costs", "collect"]


EPILOG = """examples:
  # thresholds that cost at most 1 top-1 point on held-out images (the val/ folder of an ImageFolder root)
  sd-plugin calibrate work_dirs/r18/checkpoint-last.pth --data ~/data/cifar10 --split val --max-drop 1 \\
      -o policy.json
  # the most accurate thresholds within 60% of the plain model's FLOPs, MMPretrain model on its config's val set
  sd-plugin calibrate work_dirs/x/epoch_10.pth --config my_sd_config.py --mm-split val --budget 0.6 -o policy.json
  # training images the model never saw, listed in an annotation file ('relative/path.jpg label' per line)
  sd-plugin calibrate ckpt.pth --data DATA --split train --ann held_out.txt --max-drop 0.5 -o policy.json

Calibrate on images the model was not trained on: thresholds fitted to training images are too trusting.
"""


def add_calibration_args(g: Any, several: bool = False) -> None:
    """How thresholds are searched (shared with ``sd-plugin report``, whose ``--method`` takes ``several``)."""
    default = "guaranteed"  # calibrate()'s (a test checks they agree)
    g.add_argument("--criterion", choices=CRITERIA, default="max_prob", help="confidence score (default: %(default)s)")
    g.add_argument(
        "--method",
        choices=METHODS,
        nargs="+" if several else None,
        default=[default] if several else default,
        help="'guaranteed': the target holds on new images with probability 1 - delta; 'empirical': it holds on "
        f"these images{'; several: each, side by side' if several else ''} (default: {default})",
    )
    g.add_argument(
        "--delta",
        type=float,
        default=DEFAULT_DELTA,
        help="failure probability of the 'guaranteed' method (default: %(default)s)",
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose early-exit thresholds on held-out images; write an ExitPolicy JSON",
        description=plain_doc(__doc__),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_data_args(p, split="val", what="held-out images the model was not trained on")
    g = p.add_argument_group("target (give one)")
    target = g.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-drop", type=float, help="largest top-1 drop below the deepest exit (points)")
    target.add_argument("--budget", type=float, help="largest average cost, a fraction of the plain model's FLOPs")
    add_calibration_args(g)
    p.add_argument("-o", "--out", required=True, help="policy file to write (JSON)")
    add_progress_arg(p)
    p.set_defaults(run=run)


def calibrate_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``--method`` / ``--delta`` as :func:`sd_plugin.deploy.calibrate`'s keyword arguments."""
    return {"method": args.method, "delta": args.delta}


def count_costs(model: nn.Module, example: torch.Tensor) -> Optional[Any]:
    """:func:`sd_plugin.deploy.exit_costs` (FLOPs and parameters per exit); ``None`` without mmengine."""
    from ..deploy import exit_costs

    try:
        return exit_costs(model, example)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("mmengine"):
            raise
        return None


def collect(loaded: Any, spec: Any, desc: str, show: bool, keep: int = 1) -> Tuple[Any, torch.Tensor]:
    """Every exit's logits on ``spec``'s images (:func:`collect_exit_logits`) and up to ``keep`` of the inputs."""
    from ..deploy import collect_exit_logits

    data = batches(loaded, spec)
    store: List[torch.Tensor] = []
    items = keep_images(progress(data, desc, show, total=len(data)), store, keep)
    logits = collect_exit_logits(loaded.model, items)
    return logits, torch.cat(store).to(loaded.device)


def run(args: argparse.Namespace) -> int:
    from ..deploy import calibrate, evaluate_policy

    if args.budget is not None and args.budget <= 0:
        raise ValueError(f"--budget is a fraction of the plain model's FLOPs (e.g. 0.6), got {args.budget}.")
    options = calibrate_options(args)
    spec = data_spec(args)
    loaded = load_model(args)
    data, images = collect(loaded, spec, "calibration images", not args.no_progress)
    costs = count_costs(loaded.model, images[:1])
    if costs is None and args.budget is not None:
        raise ValueError(
            "--budget is a fraction of the plain model's FLOPs, counted by mmengine's FlopAnalyzer, which is not "
            "installed: pip install mmengine, or give --max-drop instead."
        )
    fractions = costs.answer_fractions() if costs is not None else None
    policy = calibrate(
        data, max_drop=args.max_drop, budget=args.budget, costs=fractions, criterion=args.criterion, **options
    )
    policy.info["calibrated_on"] = {
        "model": loaded.name,
        "checkpoint": args.checkpoint,
        "data": spec.describe(),
        "num_samples": int(data.targets.numel()),
        "costs": "answer FLOPs / plain model's FLOPs" if fractions else "exit k costs k / (exits + 1)",
    }
    policy.save(args.out)
    stats = evaluate_policy(data, policy, fractions)
    exit_share = cast(Dict[str, float], stats["exit_share"])
    shares = ", ".join(f"{name} {100 * s:.0f}%" for name, s in exit_share.items())
    thresholds = ", ".join("never" if t is None else f"{t:.4f}" for t in policy.thresholds)
    print(f"thresholds ({policy.criterion}): {thresholds}")
    print(
        f"on {spec.describe()} ({data.targets.numel()} images): top-1 {stats['top1']:.2f} "
        f"(deepest {stats['deepest_top1']:.2f}), average cost {stats['cost']:.3f}, answered by: {shares}"
    )
    print(f"wrote {args.out}")
    return 0
