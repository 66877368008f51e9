"""What switching RevViT to plain backprop costs: peak memory of one training step, reversible vs plain.

``SelfDistillClassifier`` sets ``no_custom_backward=True`` on a RevViT backbone so the exits' losses reach its
layers (see ``sd_plugin/mmpretrain_adapter/_discovery.py``). This measures that switch alone, on the plain
``ImageClassifier`` of a packaged RevViT config (5 classes, random weights and images): the growth of the process's
peak resident memory over one forward and backward pass, each mode in a fresh subprocess, in alternating order.

Example:
    python -m tools.revvit_memory --batch-size 16 --size 224 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import resource
import subprocess
import sys
from typing import List, Optional

CONFIG = "revvit/revvit-small_8xb256_in1k.py"


def _one_step(mode: str, batch_size: int, size: int, config: str) -> float:
    """MiB of peak-RSS growth over one training step of the plain model in ``mode`` ('reversible' or 'plain')."""
    import os
    import warnings

    import mmpretrain
    import torch
    from mmengine import Config
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    warnings.filterwarnings("ignore")
    path = os.path.join(os.path.dirname(mmpretrain.__file__), ".mim", "configs", config)
    model_cfg = copy.deepcopy(Config.fromfile(path).model.to_dict())
    model_cfg["head"]["num_classes"] = 5
    for part in (model_cfg, model_cfg["backbone"], model_cfg["head"]):
        part.pop("init_cfg", None)
    model_cfg["backbone"]["no_custom_backward"] = mode == "plain"
    torch.manual_seed(0)
    model = MODELS.build(dict(model_cfg, type="ImageClassifier")).train()
    x = torch.randn(batch_size, 3, size, size)
    samples = [DataSample().set_gt_label(i % 5) for i in range(batch_size)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(x, samples, mode="loss")["loss"].backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=2, help="subprocesses per mode (default 2)")
    parser.add_argument("--config", default=CONFIG, help=f"packaged RevViT config (default {CONFIG})")
    parser.add_argument("--child", choices=["reversible", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(f"{_one_step(args.child, args.batch_size, args.size, args.config):.0f}")
        return 0
    results: dict = {"reversible": [], "plain": []}
    for _ in range(args.repeats):
        for mode in ("reversible", "plain"):
            cmd = [
                sys.executable,
                "-m",
                "tools.revvit_memory",
                "--child",
                mode,
                "--batch-size",
                str(args.batch_size),
                "--size",
                str(args.size),
                "--config",
                args.config,
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode].append(float(out))
    for mode, values in results.items():
        print(f"{mode:10s} peak RSS growth over one step (MiB): {', '.join(f'{v:.0f}' for v in values)}")
    ratio = min(results["plain"]) / max(min(results["reversible"]), 1.0)
    print(f"plain / reversible (smallest of each): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
