"""Quick start (`make demo`): train a small classifier with self-distillation through MMPretrain's Runner.

Trains the demo config (a quarter-width CIFAR ResNet-18 on the embedded 2,000-image
CIFAR-10 subset in ``demo_data/``) with mmengine's Runner, evaluates every exit
on the 500 held-out images, and prints a per-exit table: top-1 of each exit, the
deepest classifier and the ensemble, with the parameters and FLOPs a model
ending at that exit needs. Then it trains the plain model (the same config as a
plain ``ImageClassifier``: same data, schedule and seed) and adds it as a row,
with the difference, so the table shows what the exits bought.

Usage:
    python examples/quickstart.py               # about 4 minutes on 2 quiet CPU cores
    python examples/quickstart.py --epochs 2    # quicker smoke run
    python examples/quickstart.py --no-plain    # self-distillation only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

import sd_plugin  # noqa: F401  (registers the MMPretrain components)
from sd_plugin.deploy import exit_costs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo" / "sd_resnet18-w16_cifar10-mini.py"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="an MMPretrain config with the two lines")
    parser.add_argument("--work-dir", default=str(ROOT / "work_dirs" / "demo"), help="where logs and checkpoints go")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's max_epochs")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-model row")
    return parser.parse_args()


#: Binomial standard error of a top-1 near 50 % on the 500 held-out images, in points: sqrt(0.25 / 500).
TEST_NOISE = 100 * (0.25 / 500) ** 0.5


def plain_config(cfg: Config) -> Config:
    """The same config as a plain ``ImageClassifier``: self-distillation options dropped, plain accuracy metric."""
    from sd_plugin.core import SelfDistillConfig

    plain = copy.deepcopy(cfg)
    for key in (*SelfDistillConfig.option_names(), "stage_modules", "probe_size", "eval_exits", "early_exit"):
        plain.model.pop(key, None)
    plain.model.type = "ImageClassifier"
    plain.val_evaluator = dict(type="Accuracy", topk=(1,))
    plain.test_evaluator = plain.val_evaluator
    plain.work_dir = os.path.join(cfg.work_dir, "plain")
    return plain


def plain_rows(plain_top1: float, deepest_top1: float) -> str:
    """The plain model's row and the difference, to append to the exit table."""
    return (
        f"| plain model (same budget) | {plain_top1:.1f} | | |\n"
        f"| deepest - plain | {deepest_top1 - plain_top1:+.1f} | | |"
    )


def exit_table(metrics: Dict[str, float], params: List[int], flops: List[int], total: Tuple[int, int]) -> str:
    """Markdown table of top-1, parameters and FLOPs per exit; ``total`` is the whole model's (params, FLOPs)."""
    names = sorted(
        {k.split("/")[-1].rsplit("_top", 1)[0] for k in metrics if k.endswith("_top1")},
        key=lambda n: (n == "ensemble", n == "deepest", n),
    )
    rows = ["| classifier | top-1 (%) | params (M) | MFLOPs (1 image) |", "| --- | ---: | ---: | ---: |"]
    for i, name in enumerate(names):
        top1 = next(v for k, v in metrics.items() if k.endswith(f"/{name}_top1") or k == f"{name}_top1")
        if name == "ensemble":
            rows.append(f"| ensemble | {top1:.1f} | {total[0] / 1e6:.2f} | {total[1] / 1e6:.1f} |")
            continue
        rows.append(f"| {name} | {top1:.1f} | {params[i] / 1e6:.2f} | {flops[i] / 1e6:.1f} |")
    return "\n".join(rows)


def main() -> int:
    args = parse_args()
    cfg = Config.fromfile(args.config)
    cfg.work_dir = args.work_dir
    if args.epochs is not None:
        cfg.train_cfg.max_epochs = args.epochs
        cfg.train_cfg.val_interval = args.epochs
        if cfg.param_scheduler.get("type") == "CosineAnnealingLR":
            cfg.param_scheduler.T_max = args.epochs
    start = time.time()
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    model = runner.model.eval()
    costs = exit_costs(model, torch.zeros(1, 3, 32, 32))
    total = (sum(p.numel() for p in model.parameters()), costs.flops[-1] + sum(costs.exit_flops))
    table = exit_table(metrics, costs.params, costs.flops, total)
    plain_top1 = None
    if not args.no_plain:
        plain_runner = Runner.from_cfg(plain_config(cfg))
        plain_runner.train()
        plain_top1 = float(plain_runner.val_loop.run()["accuracy/top1"])
        deepest = next(v for k, v in metrics.items() if k.endswith("deepest_top1"))
        table += "\n" + plain_rows(plain_top1, deepest)
    wall = time.time() - start
    print_log(f"self-distillation demo finished in {wall:.0f} s", logger="current", level=logging.INFO)
    print("\nPer-exit results on the 500 held-out images (demo_data/cifar10_mini/test):\n")
    print(table)
    if plain_top1 is not None:
        print(
            f"\nEach top-1 on the 500 test images carries about +-{TEST_NOISE:.1f} points of binomial noise (one "
            f"standard error), the difference of two of them about +-{TEST_NOISE * 2**0.5:.1f}: read differences "
            "smaller than that as noise. See the README's Results for the benchmark."
        )
    summary = {
        "metrics": metrics,
        "plain_top1": plain_top1,
        "params": costs.params,
        "flops": costs.flops,
        "wall_s": wall,
    }
    os.makedirs(cfg.work_dir, exist_ok=True)
    with open(os.path.join(cfg.work_dir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
