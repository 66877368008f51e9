"""Helpers of ``sd-plugin train-timm`` (:mod:`sd_plugin.cli.train_timm`): distributed setup, model, data, resume,
one epoch of training, per-exit validation."""

from __future__ import annotations

import argparse
import os
import pickle
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .._dist import init_process_group_from_env
from .._io import check_checkpoint_file
from .._safe_globals import load_checkpoint_file, refuse_unsafe_checkpoint
from ..core import SelfDistillConfig, SelfDistillOutput
from ..core.naming import exit_names

__all__ = [
    "DistInfo",
    "setup_distributed",
    "create_model",
    "sd_config",
    "seed_epoch",
    "load_resume_checkpoint",
    "wrap_ddp",
    "average_over_ranks",
    "build_dataset",
    "build_loader",
    "WithIndex",
    "labels_of",
    "autocast",
    "train_one_epoch",
    "evaluate",
    "format_table",
]


@dataclass
class DistInfo:
    """Where this process runs: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: For the error when WORLD_SIZE says distributed but other torchrun variables are missing.
_TIMM_LAUNCH = (
    "a distributed run (WORLD_SIZE > 1)",
    "Start it with `torchrun --nproc_per_node=N -m sd_plugin train-timm ...`, or unset WORLD_SIZE for a single "
    "process.",
)


def setup_distributed(device: str, timeout_s: Optional[float] = None) -> DistInfo:
    """Init torch DDP when launched by torchrun (gloo on CPU, nccl on CUDA); a single process otherwise.

    The process group starts in :func:`sd_plugin._dist.init_process_group_from_env` (torchrun's variables).

    Args:
        device: ``'cpu'`` or ``'cuda'``.
        timeout_s: How long a collective waits for the other ranks before it fails (None: torch's default).
    """
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"the distributed timeout must be a positive number of seconds, got {timeout_s}.")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world_size <= 1:
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        init_process_group_from_env("nccl" if dev.type == "cuda" else "gloo", timeout_s, _TIMM_LAUNCH)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)


def create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """timm.create_model at --img-size when the model takes an img_size, else its own size."""
    import timm

    kwargs: Dict[str, Any] = dict(pretrained=args.pretrained, num_classes=num_classes)
    if args.initial_checkpoint:
        check_checkpoint_file(args.initial_checkpoint, "--initial-checkpoint")
        kwargs["checkpoint_path"] = args.initial_checkpoint
    try:
        if args.img_size:
            try:
                return timm.create_model(args.model, img_size=args.img_size, **kwargs)
            except TypeError:
                pass  # a fully convolutional model: takes any size
        return timm.create_model(args.model, **kwargs)
    except RuntimeError as err:  # timm loads with weights_only=True and reports a refused pickle this way
        if isinstance(err.__cause__, pickle.UnpicklingError):
            raise refuse_unsafe_checkpoint(args.initial_checkpoint, err.__cause__, "--initial-checkpoint") from err
        raise


def sd_config(args: argparse.Namespace) -> SelfDistillConfig:
    """The exits' options from the ``--sd-*`` flags and the methods' flags."""
    return SelfDistillConfig(
        exit_indices=[] if args.sd_no_exits else args.sd_exit_indices,
        temperature=args.sd_temperature,
        ce_weight=args.sd_ce_weight,
        kd_weight=args.sd_kd_weight,
        hint_weight=args.sd_hint_weight,
        hint_form=args.sd_hint_form,
        pskd_alpha=args.pskd,
        cskd_weight=args.cs_kd,
        tfkd_weight=args.tfkd,
        zipf_weight=args.zipf,
        zipf_power=args.zipf_power,
        deepest_weight=args.sd_deepest_weight,
        exit_hidden_ratio=args.sd_exit_hidden_ratio,
    )


def seed_epoch(seed: int, epoch: int, rank: int, loader: DataLoader) -> None:
    """Seed every random source from (seed, epoch, rank), so a resumed run repeats the epochs it re-runs exactly."""
    epoch_seed = seed + 1000 * epoch + rank
    random.seed(epoch_seed)
    np.random.seed(epoch_seed % 2**32)
    torch.manual_seed(epoch_seed)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)


RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "epoch")


def load_resume_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint-last.pth of an earlier run, or a ValueError that says what the file is instead."""
    check_checkpoint_file(path, "--resume", pattern="checkpoint-*.pth")
    ckpt = load_checkpoint_file(
        path, "--resume", mmengine_objects=False
    )  # data only: a crafted file is refused, its code never runs
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(
            f"--resume {path!r} is not a checkpoint of sd-plugin train-timm (no {missing}): resume from the "
            "checkpoint-last.pth of an earlier run; to start from plain timm weights use --initial-checkpoint."
        )
    return ckpt


def wrap_ddp(net: nn.Module, info: Any) -> DistributedDataParallel:
    """The DDP wrapper of ``sd-plugin train-timm`` (torch's defaults: ``broadcast_buffers=True``, no
    ``find_unused_parameters``).

    Validation runs on rank 0 alone, over the whole validation set: DDP keeps the parameters identical on every
    rank and, with ``broadcast_buffers=True``, every forward starts from rank 0's BatchNorm buffers, so rank 0
    holds the model all ranks train; sharding validation would give the same numbers, only sooner.
    """
    return DistributedDataParallel(net, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def average_over_ranks(stats: Dict[str, Any], info: DistInfo) -> Dict[str, Any]:
    """Epoch loss and loss terms averaged over the ranks (each rank trains on its own shard), per-rank losses kept."""
    if not info.distributed:
        return stats
    names = sorted(stats["terms"])
    local = torch.tensor([stats["loss"], *(stats["terms"][k] for k in names)], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(info.world_size)]
    dist.all_gather(gathered, local)
    mean = torch.stack(gathered).mean(dim=0).tolist()
    return dict(stats, loss=mean[0], terms=dict(zip(names, mean[1:])), loss_per_rank=[g[0].item() for g in gathered])


def build_dataset(
    root: str, split: str, transform: Optional[Callable], max_samples: int, seed: int
) -> Tuple[Dataset, int]:
    """timm's ImageFolder dataset of ``root/split`` (optionally a fixed random subset) and its class count."""
    from timm.data import create_dataset

    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise ValueError(f"no folder {path!r}: the data root needs one sub-folder per split (e.g. train/ and val/).")
    dataset = create_dataset("", root=path, transform=transform)
    num_classes = len(dataset.reader.class_to_idx)
    if 0 < max_samples < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = Subset(dataset, order[:max_samples].tolist())
    return dataset, num_classes


class WithIndex(Dataset):
    """``dataset[i]`` plus ``i`` (the sample's data-set index, which PS-KD keys its past predictions by)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tuple[Any, ...]:
        return (*self.dataset[i], i)


def labels_of(dataset: Dataset) -> List[int]:
    """The class of every sample of a timm ImageFolder data set (or a ``Subset``/``WithIndex`` of one), in order."""
    if isinstance(dataset, WithIndex):
        return labels_of(dataset.dataset)
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    reader = getattr(dataset, "reader", None)
    samples = getattr(reader, "samples", None)
    if samples is None:
        raise TypeError(f"cannot read the labels of {type(dataset).__name__} (no reader.samples) for the pair sampler.")
    return [int(target) for _, target in samples]


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int,
    info: DistInfo,
    seed: int,
    sampler: Optional[Sampler] = None,
) -> DataLoader:
    """A DataLoader with a DistributedSampler under DDP (training only; validation runs on rank 0).

    ``sampler`` replaces both (e.g. CS-KD's class-pair sampler, which shards by itself).
    """
    if sampler is None and train and info.distributed:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=train,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed) if train else None,
    )


def autocast(device: torch.device, enabled: bool) -> ContextManager[Any]:
    """bf16 autocast (CPU and CUDA) when ``enabled``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    info: DistInfo,
    amp: bool,
    mixup: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
    progress: bool = True,
    desc: str = "train",
) -> Dict[str, Any]:
    """One epoch; returns the mean loss, mean loss terms and per-step wall times (seconds)."""
    from tqdm import tqdm

    model.train()
    totals: Dict[str, float] = {}
    step_times: List[float] = []
    loss_sum, steps = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not (progress and info.is_main), leave=False, mininterval=1.0)
    for batch in bar:
        t0 = time.perf_counter()
        x, y = batch[0], batch[1]
        index = batch[2] if len(batch) > 2 else None  # data-set indices (WithIndex), for PS-KD
        x, y = x.to(info.device), y.to(info.device)
        if mixup is not None:
            x, y = mixup(x, y)
        with autocast(info.device, amp):
            out = model(x)
        loss = criterion(out, y) if index is None else criterion(out, y, sample_index=index.to(y.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - t0)
        loss_sum += float(loss.detach())
        steps += 1
        for name, value in getattr(criterion, "last_terms", {}).items():
            totals[name] = totals.get(name, 0.0) + float(value)
        bar.set_postfix(loss=f"{loss_sum / steps:.3f}")
    if steps == 0:
        raise ValueError("the training loader gave no full batch: lower --batch-size or raise --max-train-samples.")
    return dict(
        loss=loss_sum / steps,
        terms={k: v / steps for k, v in totals.items()},
        steps=steps,
        step_time_mean=sum(step_times) / steps,
        step_times=[round(t, 4) for t in step_times],
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, info: DistInfo, amp: bool, with_exits: bool) -> Dict[str, float]:
    """Top-1 (%) of every exit, the deepest classifier and the ensemble (mean softmax), from one pass per batch."""
    model.eval()
    correct: Dict[str, int] = {}
    total = 0
    for x, y in loader:
        x, y = x.to(info.device), y.to(info.device)
        with autocast(info.device, amp):
            if with_exits:
                out: SelfDistillOutput = model.forward_train(x)  # type: ignore[operator]
                preds = dict(zip(exit_names(out.num_exits), out.all_logits()))
                preds["ensemble"] = out.ensemble_probs()
            else:
                preds = {"deepest": model(x)}
        for name, scores in preds.items():
            correct[name] = correct.get(name, 0) + int((scores.argmax(dim=1) == y).sum())
        total += int(y.shape[0])
    if total == 0:
        raise ValueError("the validation set is empty: check --val-split and --max-val-samples.")
    return {name: 100.0 * c / total for name, c in correct.items()}


def format_table(rows: List[Tuple[int, Dict[str, float]]]) -> str:
    """Per-epoch top-1 table, one column per exit, then deepest and ensemble."""
    if not rows:
        return ""
    cols = list(rows[-1][1])
    lines = ["epoch | " + " | ".join(f"{c:>8s}" for c in cols), "-" * (8 + 11 * len(cols))]
    for epoch, accs in rows:
        lines.append(f"{epoch:5d} | " + " | ".join(f"{accs.get(c, float('nan')):8.2f}" for c in cols))
    return "\n".join(lines)
