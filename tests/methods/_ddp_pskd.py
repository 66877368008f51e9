"""Two-rank CPU (gloo) probe of PS-KD's past predictions and the class-pair sampler.

``python _ddp_pskd.py OUT`` spawns two processes. Each trains a tiny linear
classifier wrapped in DDP for a few steps with ``SelfDistillLoss(pskd_alpha=0.8)``
on its own half of each global batch (different sample indices per rank), then
saves its past-prediction table, the model weights and the ``ClassPairSampler``
indices it was given to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

WORLD, STEPS, HALF, CLASSES, FEATS, SAMPLES = 2, 3, 4, 3, 5, 24


def global_batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        idx = torch.randperm(SAMPLES, generator=g)[: WORLD * HALF]
        out.append(
            (
                torch.randn(WORLD * HALF, FEATS, generator=g),
                torch.randint(0, CLASSES, (WORLD * HALF,), generator=g),
                idx,
            )
        )
    return out


class _Labels:
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def get_gt_labels(self):
        return self.labels


def run(rank: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", os.environ.get("PSKD_PORT", "29533")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from sd_plugin.core import SelfDistillLoss, SelfDistillOutput
    from sd_plugin.mmpretrain_adapter import ClassPairSampler

    torch.manual_seed(0)
    model = torch.nn.Linear(FEATS, CLASSES)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    loss_fn = SelfDistillLoss(exit_indices=[], pskd_alpha=0.8)
    for step, (x, y, idx) in enumerate(global_batches()):
        loss_fn.set_progress(step / STEPS)
        part = slice(rank * HALF, (rank + 1) * HALF)
        logits = ddp(x[part])
        output = SelfDistillOutput(logits, torch.zeros(HALF, 1), [], [])
        loss = loss_fn(output, y[part], sample_index=idx[part])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sampler = ClassPairSampler(_Labels([i % 3 for i in range(11)]), seed=5)
    torch.save(
        {"state": loss_fn.method_state(), "weight": model.weight.detach().clone(), "sampler": list(sampler)},
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=WORLD, join=True)
