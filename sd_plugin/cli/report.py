"""``sd-plugin report``: per-exit report of a self-distillation model.

For every exit (named as the training log names them: exit1 ... deepest) and the ensemble (the softmax of
the mean logits of all classifiers, :func:`sd_plugin.core.ensemble_logits`): top-1 and top-5 on the
test images, parameters and FLOPs of a model that ends there (:func:`sd_plugin.deploy.exit_costs`;
FLOPs need mmengine). Then the early-exit curve (one max-prob threshold shared by all exits, swept) and,
given held-out calibration images, operating points (thresholds chosen on those images) and the calibrated
ensemble (weights fitted on them), every figure measured on the test images; ``--method`` takes both
calibration methods, side by side. ``--timing`` adds the latency of each exit and, per operating point, the
measured speed-up of early exit over the plain model at batch 1 and 32 (:func:`sd_plugin.deploy.measure_speedup`:
eager PyTorch and, when onnxruntime is installed, the ONNX cascade against the plain model's ONNX export), each with
its A/A noise floor, and measured over FLOPs-ideal.

Writes ``<out-dir>/<name>.json`` and ``.md``, and ``.png`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn

from .._provenance import environment
from ..deploy._timing import BATCH_TIMED
from ..deploy.speed import BATCHES
from ._baselines import (
    add_baseline_args,
    baseline_key,
    baseline_logits,
    baseline_rows,
    extra_nets,
    frontier,
    load_baselines,
    plane_points,
    point_keys,
)
from ._data import DataSpec, add_data_args, batches, data_spec, progress
from ._load import add_model_args, add_progress_arg, load_model, plain_doc
from ._render import markdown, plot
from .calibrate import add_calibration_args, calibrate_options, collect, count_costs

__all__ = [
    "add_parser",
    "run",
    "build_report",
    "ensemble_logits",
    "calibrated_ensemble",
    "exit_rows",
    "sweep",
    "operating_points",
    "time_exits",
    "time_points",
]

TOP_K = (1, 5)
SWEEP_STEPS = 41
DEFAULT_SINGLES = 16
DEFAULT_REPEATS = 5

EPILOG = """examples:
  # a checkpoint of sd-plugin train-timm on the test split of an ImageFolder root
  sd-plugin report work_dirs/r18/checkpoint-last.pth --data ~/data/cifar10 --split test
  # with early exit: thresholds calibrated on training images the model never saw, figures on the test split
  sd-plugin report work_dirs/r18/checkpoint-last.pth --data ~/data/cifar10 --split test \\
      --calib-split train --calib-ann held_out.txt --max-drops 0.5 1
  # both calibration methods side by side (the price of the guarantee), with measured speed-ups
  # (eager and ONNX Runtime, each against its A/A noise floor, and against the FLOPs-ideal)
  sd-plugin report work_dirs/r18/checkpoint-last.pth --data ~/data/cifar10 --split test \\
      --calib-split train --calib-ann held_out.txt --method guaranteed empirical --timing --repeats 15 --b1-images 64
  # an MMPretrain model on its config's test set, calibrated on its val set, with latency (eager PyTorch only)
  sd-plugin report work_dirs/x/epoch_10.pth --config my_sd_config.py --mm-split test --calib-mm-split val \\
      --timing --no-onnx
  # early exit against smaller plain models: accuracy and latency side by side, and which of them no other beats
  sd-plugin report work_dirs/r18/checkpoint-last.pth --data ~/data/cifar10 --split test \\
      --calib-split train --calib-ann held_out.txt --timing --baseline work_dirs/r10_plain/checkpoint-last.pth
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="per-exit accuracy, parameters, FLOPs, ensemble and calibrated early exit",
        description=plain_doc(__doc__),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_data_args(p, split="test", what="test images: every figure is measured on them")
    c = p.add_argument_group("early exit (operating points; off unless calibration images are given)")
    c.add_argument("--calib-split", help="split under --data holding held-out calibration images")
    c.add_argument("--calib-ann", help="annotation file listing the calibration images of --calib-split")
    c.add_argument("--calib-mm-split", choices=("val", "test"), help="MMPretrain: the config's set as calibration")
    c.add_argument("--calib-samples", type=int, default=2000, help="calibration images used (0: all)")
    c.add_argument("--max-drops", type=float, nargs="+", default=[0.5, 1.0], help="targets (top-1 points)")
    add_calibration_args(c, several=True)
    t = p.add_argument_group("timing")
    t.add_argument("--timing", action="store_true", help="measure latency per exit and early exit's speed-up")
    t.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed rounds (medians reported)")
    t.add_argument("--b1-images", type=int, default=DEFAULT_SINGLES, help="images timed one by one")
    t.add_argument(
        "--no-onnx", action="store_true", help="time eager PyTorch only (default: ONNX Runtime too, when installed)"
    )
    t.add_argument(
        "--channels-last",
        action="store_true",
        help="time every model in PyTorch's channels-last memory format (the eager figures; ONNX is unaffected)",
    )
    add_baseline_args(p.add_argument_group("comparison with plain models (scored and timed alongside the exits)"))
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default="sd_plugin_report", help="folder of the .json/.md/.png (default: %(default)s)")
    o.add_argument("--name", help="file stem (default: report_<model>)")
    add_progress_arg(p)
    p.set_defaults(run=run)


def ensemble_logits(data: Any, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(N, C) logits of the ensemble of :class:`~sd_plugin.deploy.ExitLogits`: the library's one definition,
    :func:`sd_plugin.core.ensemble_logits` (equal weights: BYOT's mean of the logits)."""
    from ..core import ensemble_logits as library_ensemble

    return library_ensemble(data.logits, weights)


def calibrated_ensemble(cal: Any, test: Any, delta: float) -> Dict[str, Any]:
    """The ensemble with weights fitted on the calibration images (:func:`sd_plugin.core.fit_ensemble_weights`,
    the deepest classifier alone unless the fit beats it significantly in cross-validation), scored on the test
    images."""
    from ..core import fit_ensemble_weights

    fit = fit_ensemble_weights(cal.logits, cal.targets, delta=delta)
    logits = ensemble_logits(test, fit.weights)
    out: Dict[str, Any] = {"weights": fit.weights, "chosen": fit.chosen, "cv_top1": fit.cv_top1, "p_value": fit.p_value}
    out.update({f"top{n}": topk(logits, test.targets, n) for n in TOP_K})
    return out


def topk(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Top-``k`` accuracy (percent); ``k`` is capped at the number of classes."""
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, dim=-1).indices == targets[:, None]).any(-1).float().mean()) * 100


def exit_params(model: nn.Module, example: torch.Tensor, num_exits: int) -> List[int]:
    """Parameters of a model ending at each exit (what ``exit_costs`` counts, without its FLOP counter)."""
    from ..deploy import truncate

    nets = [truncate(model, exit=k + 1, example_input=example) for k in range(num_exits + 1)]
    return [sum(p.numel() for p in net.parameters()) for net in nets]


def exit_rows(model: nn.Module, data: Any, example: torch.Tensor, costs: Optional[Any]) -> List[Dict[str, Any]]:
    """Top-k, parameters and FLOPs of every exit, the deepest classifier and the ensemble."""
    e = data.num_exits
    params = costs.params if costs is not None else exit_params(model, example, e)
    flops: List[Optional[int]] = list(costs.flops) if costs is not None else [None] * (e + 1)
    ens_flops = costs.answer_costs()[-1] if costs is not None else None
    outputs = [*data.logits, ensemble_logits(data)]
    rows = []
    for k, logits in enumerate(outputs):
        deep = k <= e
        f = flops[k] if deep else ens_flops
        row: Dict[str, Any] = {"exit": data.names[k] if deep else "ensemble", "number": k + 1 if deep else None}
        row.update({f"top{n}": topk(logits, data.targets, n) for n in TOP_K})
        row["params"] = params[k] if deep else sum(p.numel() for p in model.parameters())
        row["flops"] = f
        row["flops_fraction"] = f / flops[-1] if f is not None and flops[-1] else None
        rows.append(row)
    return rows


def sweep(data: Any, answer: Optional[Sequence[float]], steps: int = SWEEP_STEPS) -> List[Dict[str, float]]:
    """The early-exit curve: one max-prob threshold shared by every exit, from 0 to 1."""
    from ..deploy import ExitPolicy, evaluate_policy

    out = []
    for t in torch.linspace(0, 1, steps).tolist():
        stats = evaluate_policy(data, ExitPolicy([t] * data.num_exits), answer)
        out.append({"threshold": t, "top1": stats["top1"], "cost": stats["cost"]})
    return out


def operating_points(
    cal: Any,
    test: Any,
    costs: Optional[Any],
    max_drops: Sequence[float],
    options: Dict[str, Any],
) -> List[Any]:
    """(point, policy) per target: thresholds calibrated on ``cal`` (``options``: :func:`calibrate`'s keyword
    arguments, the method among them), accuracy and shares measured on ``test``.

    With ``costs`` (:class:`~sd_plugin.deploy.ExitCosts`) the search prefers fewer FLOPs and each point has its
    average FLOPs and the FLOPs-ideal speed-up (the plain model's FLOPs over them).
    """
    from ..deploy import calibrate, evaluate_policy

    answer = costs.answer_costs() if costs is not None else None
    points: List[Tuple[Dict[str, Any], Any]] = []
    for drop in max_drops:
        try:
            policy = calibrate(cal, max_drop=drop, costs=answer, **options)
        except ValueError as err:  # a target the calibration data cannot meet: say so, keep the others
            points.append(({"method": options["method"], "max_drop": drop, "error": str(err)}, None))
            continue
        stats = evaluate_policy(test, policy, answer)
        flops = float(cast(float, stats["cost"])) if costs is not None else None
        point = {
            "max_drop": drop,
            "criterion": policy.criterion,
            "thresholds": policy.thresholds,
            **{k: v for k, v in policy.info.items() if k != "target"},
            "test": {**stats, "flops": flops, "num_samples": int(test.targets.numel())},
            "ideal_speedup": costs.flops[-1] / flops if costs is not None and flops else None,
        }
        points.append((point, policy))
    return points


def _ensemble_net(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Every exit and the deepest classifier in one pass, then the ensemble (what the ensemble costs)."""
    from ..deploy import collect_exit_logits

    def run(x: torch.Tensor) -> torch.Tensor:
        return ensemble_logits(collect_exit_logits(model, [(x, torch.zeros(len(x), dtype=torch.long))]))

    return run


def time_exits(
    model: nn.Module,
    names: List[str],
    images: torch.Tensor,
    singles: int,
    repeats: int,
    extra: Optional[Dict[str, Callable[[torch.Tensor], Any]]] = None,
) -> Dict[str, Any]:
    """Median latency (ms) of a model ending at each exit, of the ensemble and of the ``extra`` callables (early
    exit, plain models), at batch 1 and 32, all in the same interleaved rounds."""
    from ..deploy import truncate
    from ..deploy._timing import each, interleaved_medians, timed_inputs

    nets: Dict[str, Callable[[torch.Tensor], Any]] = {
        n: truncate(model, exit=k + 1, example_input=images[:1]) for k, n in enumerate(names)
    }
    nets["ensemble"] = _ensemble_net(model)
    nets.update(extra or {})
    ones, b32 = timed_inputs(images, singles)
    lat1 = interleaved_medians({n: each(m, ones) for n, m in nets.items()}, repeats, prime=True)
    lat32 = interleaved_medians({n: each(m, [b32]) for n, m in nets.items()}, repeats, prime=True)
    return {n: {"latency_b1_ms": 1e3 * lat1[n] / len(ones), "latency_b32_ms": 1e3 * lat32[n]} for n in nets}


def time_points(
    model: nn.Module, points: Sequence[Tuple[Dict[str, Any], Any]], images: torch.Tensor, args: argparse.Namespace
) -> Dict[str, Any]:
    """Measured speed-ups of every operating point (:func:`sd_plugin.deploy.measure_speedup`), with each one's
    ratio to the FLOPs-ideal speed-up; returns why ONNX Runtime was not timed (``None``: it was)."""
    from ..deploy import measure_speedup
    from ..deploy.speed import onnx_unavailable

    no_onnx = "--no-onnx" if args.no_onnx else onnx_unavailable(model)
    for point, policy in points:
        if policy is None:
            continue
        speed = measure_speedup(
            model, policy, images, b1_images=args.b1_images, repeats=args.repeats, onnx=no_onnx is None
        )
        ideal = point["ideal_speedup"]
        point.update(speed)
        point["measured_over_ideal"] = (
            {k.replace("_speedup", ""): v / ideal for k, v in speed.items() if "_speedup_" in k} if ideal else None
        )
    return {"onnx_not_timed": no_onnx}


def _calib_spec(args: argparse.Namespace, test: DataSpec) -> Optional[DataSpec]:
    if not (args.calib_split or args.calib_ann or args.calib_mm_split):
        return None
    if args.calib_mm_split:
        if args.calib_mm_split == args.mm_split:
            raise ValueError("calibrating on the test set would report fitted figures: give another --calib-mm-split.")
        return replace(
            test,
            root=None,
            split=None,
            ann=None,
            mm_split=args.calib_mm_split,
            max_samples=args.calib_samples,
            seed=test.seed + 1,
        )
    split = args.calib_split or args.split
    if not args.data:
        raise ValueError("--calib-split/--calib-ann are folders under --data: give --data (or --calib-mm-split).")
    if split == args.split and not args.calib_ann:
        raise ValueError(
            "calibrating on the test split would report fitted figures: give --calib-split (held-out images) or "
            "--calib-ann (the images of it the model was not trained on)."
        )
    return replace(
        test, split=split, ann=args.calib_ann, mm_split=None, max_samples=args.calib_samples, seed=test.seed + 1
    )


def _channels_last(models: Sequence[nn.Module], images: torch.Tensor) -> torch.Tensor:
    """The models (in place) and images in PyTorch's channels-last memory format, as a CPU or GPU deployment may run
    them; every answer stays the same up to floating-point rounding."""
    if images.dim() != 4:
        raise ValueError(
            f"--channels-last needs image batches (N, C, H, W), got inputs of shape {tuple(images.shape)}."
        )
    for m in models:
        m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return images.contiguous(memory_format=torch.channels_last)


def build_report(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The report of :func:`run` as a dict (what the .json holds)."""
    spec = data_spec(args)
    cal_spec = _calib_spec(args, spec)
    options = calibrate_options(args)
    methods = list(dict.fromkeys(options.pop("method")))
    if args.channels_last and not args.timing:
        raise ValueError("--channels-last is a memory format for the timings: give --timing too.")
    if args.timing and (args.repeats < 1 or args.b1_images < 1):
        raise ValueError("--repeats and --b1-images must be >= 1.")
    loaded = load_model(args)
    show = not args.no_progress
    keep = max(BATCH_TIMED, args.b1_images) if args.timing else 1
    data, images = collect(loaded, spec, "test images", show, keep)
    example = images[:1]
    costs = count_costs(loaded.model, example)
    answer = costs.answer_costs() if costs is not None else None
    rows = exit_rows(loaded.model, data, example, costs)
    report: Dict[str, Any] = {
        "model": loaded.name,
        "source": loaded.source,
        "checkpoint": args.checkpoint,
        "data": spec.describe(),
        "num_samples": int(data.targets.numel()),
        "ensemble": "softmax of the mean logits of every exit and the deepest classifier",
        "flops_counted": costs is not None,
        "exits": rows,
        "answer_flops": answer,
        "early_exit_curve": sweep(data, answer),
        "operating_points": [],
    }
    baselines = load_baselines(args, loaded, example)
    if baselines:
        items = progress(batches(loaded, spec), "plain models", show)
        logits = baseline_logits(baselines, items)
        report["baselines"] = baseline_rows(baselines, logits, data.targets, example, topk, TOP_K)
    points: List[Tuple[Dict[str, Any], Any]] = []
    if cal_spec is not None:
        cal, _ = collect(loaded, cal_spec, "calibration images", show)
        report.update(calib_data=cal_spec.describe(), calib_samples=int(cal.targets.numel()), calib_methods=methods)
        report["calibrated_ensemble"] = calibrated_ensemble(cal, data, options["delta"])
        for method in methods:
            opts = {"criterion": args.criterion, **options, "method": method}
            points += operating_points(cal, data, costs, args.max_drops, opts)
    if args.timing:
        if args.channels_last:
            images = _channels_last([loaded.model, *(b.module for b in baselines)], images)
        extra = extra_nets(loaded.model, points, baselines)
        lat = time_exits(loaded.model, data.names, images, args.b1_images, args.repeats, extra)
        for row in rows:
            row.update(lat[row["exit"]])
        for (point, policy), key in zip(points, point_keys(points)):
            if policy is not None:
                point.update(lat[key])
        for row, b in zip(report.get("baselines", []), baselines):
            row.update(lat[baseline_key(b.name)])
        report["timing"] = {
            "device": str(loaded.device),
            "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "b1_images": min(args.b1_images, len(images)),
            "memory_format": "channels_last" if args.channels_last else "contiguous",
            **time_points(loaded.model, points, images, args),
        }
    report["operating_points"] = [p for p, _ in points]
    if args.timing:
        report["frontier"] = {
            b: [p["label"] for p in frontier(plane_points(report), f"latency_{b}_ms")] for b in BATCHES
        }
    args_given = sys.argv[1:] if argv is None else list(argv)
    report["command"] = " ".join(["sd-plugin", *map(shlex.quote, args_given)])
    report.update(environment())  # versions, hardware, date
    return report


def run(args: argparse.Namespace) -> int:
    from .._io import atomic_write

    report = build_report(args, getattr(args, "argv", None))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"report_{report['model']}"
    md = markdown(report)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", md)):
        with atomic_write(out / f"{stem}{suffix}", "w") as f:
            f.write(text)
    written = [".json", ".md"]
    why_not = plot(report, out / f"{stem}.png")
    if why_not is None:
        written += [".png", "_latency.png"] if "frontier" in report else [".png"]
    print(md)
    print(f"wrote {out / stem}{', '.join(written)}" + (f" (no plot: {why_not})" if why_not else ""))
    return 0
