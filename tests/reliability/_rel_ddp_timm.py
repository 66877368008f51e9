"""DDP probe for the timm route: a wrapped timm model trained a few steps by torch DDP (gloo, CPU).

Run under ``torchrun --nproc_per_node=2`` it trains with the DDP wrapper of ``sd-plugin train-timm``
(``wrap_ddp``: torch's defaults, so ``broadcast_buffers=True`` and no ``find_unused_parameters``), each rank on
its half of a fixed global batch. Run with ``--reference`` as one process it does the same optimisation with
gradient accumulation over the two halves (loss / 2 each), which is exactly what DDP's gradient averaging
computes, BatchNorm included: in both runs BN normalises each half with that half's statistics. With
``broadcast_buffers=True`` every forward starts from rank 0's BN buffers, so rank 0's running statistics see
only rank 0's halves; the reference reproduces that by restoring the buffers after the second half. Writes the
final parameters, buffers and per-step losses to ``OUT/rank{r}.pt`` (``OUT/reference.pt``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import timm
import torch
import torch.distributed as dist
from _rel_run import load_tool

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
                if r == 1:
                    rank0_buffers = {k: v.clone() for k, v in model.named_buffers()}
                loss = criterion(model(part["x"]), part["y"])
                (loss / WORLD).backward()
                step.append(loss.item())
            with torch.no_grad():  # rank 0's buffers are the ones DDP broadcasts at the next forward
                for k, v in model.named_buffers():
                    v.copy_(rank0_buffers[k])
            opt.step()
            losses.append(step)
        name = "reference"
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        ddp = load_tool("train_timm").wrap_ddp(model, SimpleNamespace(device=torch.device("cpu")))
        assert ddp.broadcast_buffers and not ddp.find_unused_parameters
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
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    torch.save({"params": params, "buffers": buffers, "losses": losses}, Path(args.out) / f"{name}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
