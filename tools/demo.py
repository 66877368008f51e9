"""The front-door demo: train a small classifier with self-distillation through MMPretrain's Runner.

Trains the demo config (a quarter-width CIFAR ResNet-18 on the embedded 2,000-image
CIFAR-10 subset in ``demo_data/``) with mmengine's Runner, evaluates every exit
on the 500 held-out images, and prints a per-exit table: top-1 of each exit, the
deepest classifier and the ensemble, with the parameters and FLOPs a model
ending at that exit needs.

Usage:
    python tools/demo.py                       # about 5 minutes on 2 CPU cores
    python tools/demo.py --epochs 2            # quicker smoke run
"""

from __future__ import annotations

import argparse
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
    return parser.parse_args()


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
    wall = time.time() - start
    print_log(f"self-distillation demo finished in {wall:.0f} s", logger="current", level=logging.INFO)
    print("\nPer-exit results on the 500 held-out images (demo_data/cifar10_mini/test):\n")
    print(table)
    summary = {"metrics": metrics, "params": costs.params, "flops": costs.flops, "wall_s": wall}
    os.makedirs(cfg.work_dir, exist_ok=True)
    with open(os.path.join(cfg.work_dir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
