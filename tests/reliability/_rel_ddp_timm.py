"""DDP probe for the timm route: a wrapped timm model trained a few steps by torch DDP (gloo, CPU).

Run under ``torchrun --nproc_per_node=2`` it trains with DDP (no ``find_unused_parameters``), each rank on
its half of a fixed global batch. Run with ``--reference`` as one process it does the same optimisation with
gradient accumulation over the two halves (loss / 2 each), which is exactly what DDP's gradient averaging
computes, BatchNorm included: in both runs BN normalises each half with that half's statistics. Writes the
final parameters and the per-step losses to ``OUT/rank{r}.pt`` (``OUT/reference.pt``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List

import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import sd_plugin

WORLD = 2
STEPS = 3
HALF = 4


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return sd_plugin.wrap(timm.create_model("test_resnet", num_classes=5), input_size=(3, 32, 32))


def global_batches() -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(WORLD * HALF, 3, 32, 32, generator=g), "y": torch.randint(0, 5, (WORLD * HALF,), generator=g)}
        for _ in range(STEPS)
    ]


def halves(batch: Dict[str, torch.Tensor], rank: int) -> Dict[str, torch.Tensor]:
    return {k: v[rank * HALF : (rank + 1) * HALF] for k, v in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    model = build()
    criterion = sd_plugin.SelfDistillLoss()
    losses: List[List[float]] = []
    if args.reference:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for batch in global_batches():
            opt.zero_grad()
            step = []
            for r in range(WORLD):
                part = halves(batch, r)
                loss = criterion(model(part["x"]), part["y"])
                (loss / WORLD).backward()
                step.append(loss.item())
            opt.step()
            losses.append(step)
        name = "reference"
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        for batch in global_batches():
            part = halves(batch, rank)
            opt.zero_grad()
            loss = criterion(ddp(part["x"]), part["y"])
            loss.backward()
            opt.step()
            losses.append([loss.item()])
        name = f"rank{rank}"
        dist.destroy_process_group()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.save({"params": params, "losses": losses}, Path(args.out) / f"{name}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
