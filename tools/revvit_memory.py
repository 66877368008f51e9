"""What switching RevViT to plain backprop costs: peak memory of one training step, reversible vs plain.

The switch ``SelfDistillClassifier`` makes (``no_custom_backward=True``; docs/mmpretrain.md) alone, on the plain
``ImageClassifier`` of a packaged RevViT config (5 classes, random weights and images): peak-RSS growth over one
forward and backward pass, each mode in a fresh process, in alternating order.

    python -m tools.revvit_memory --batch-size 16 --size 224 --repeats 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional

CONFIG = "revvit/revvit-small_8xb256_in1k.py"


def _one_step(mode: str, batch_size: int, size: int, config: str) -> float:
    """MiB of peak-RSS growth over one training step of the plain model in ``mode`` ('reversible' or 'plain')."""
    import os
    import warnings

    import torch
    from mmengine import Config
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    from tools.coverage_mmpretrain import CONFIG_ROOT, model_cfg  # no checkpoint loading

    warnings.filterwarnings("ignore")
    cfg = model_cfg(Config.fromfile(os.path.join(CONFIG_ROOT, config)))
    cfg["head"]["num_classes"] = 5
    cfg["backbone"]["no_custom_backward"] = mode == "plain"
    torch.manual_seed(0)
    model = MODELS.build(dict(cfg, type="ImageClassifier")).train()
    x = torch.randn(batch_size, 3, size, size)
    samples = [DataSample().set_gt_label(i % 5) for i in range(batch_size)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(x, samples, mode="loss")["loss"].backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per mode (default 2)")
    parser.add_argument("--config", default=CONFIG, help=f"packaged RevViT config (default {CONFIG})")
    args = parser.parse_args(argv)
    results: dict = {"reversible": [], "plain": []}
    for _ in range(args.repeats):
        for mode in ("reversible", "plain"):  # each step in a fresh process
            with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                mib = pool.submit(_one_step, mode, args.batch_size, args.size, args.config).result()
            results[mode].append(float(round(mib)))
    for mode, values in results.items():
        print(f"{mode:10s} peak RSS growth over one step (MiB): {', '.join(f'{v:.0f}' for v in values)}")
    ratio = min(results["plain"]) / max(min(results["reversible"]), 1.0)
    print(f"plain / reversible (smallest of each): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
