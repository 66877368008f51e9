"""Train a timm model with self-distillation exits (``sd_plugin.wrap``) on an ImageFolder data set.

Built on timm's own utilities (create_model, create_dataset, resolve_data_config/create_transform,
create_optimizer_v2, create_scheduler_v2, Mixup); flags follow timm's train.py. ``--no-sd`` trains the plain
model with the same recipe. Prints a per-exit top-1 table every epoch and writes to ``--output``:
``checkpoint-last.pth`` (wrapped model with exits, optimizer, scheduler: for ``--resume``),
``model_plain.pth`` (the unwrapped timm state dict, loads strictly into ``timm.create_model``),
``exits.pth`` (exit weights alone) with ``sd_plugin_config.json`` beside it (the exits' options:
``sd_plugin.load_exits(model, OUTPUT)`` reloads them) and ``summary.json`` (per-epoch metrics and step times).

Examples:
    python tools/train_timm.py demo_data/cifar10_mini --model resnet18 --img-size 32 --epochs 2 --output work_dirs/r18
    torchrun --nproc_per_node 2 tools/train_timm.py ~/.cache/sd_plugin/cifar10 --val-split test --model resnet18 ...
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel

import sd_plugin
from sd_plugin._io import atomic_save, atomic_write, check_checkpoint_file
from sd_plugin._safe_globals import load_checkpoint_file, refuse_unsafe_checkpoint
from sd_plugin.core import SelfDistillConfig, soft_cross_entropy
from sd_plugin.core.methods import ClassPairIndexSampler
from sd_plugin.timm_adapter._train_utils import (
    WithIndex,
    build_dataset,
    build_loader,
    evaluate,
    format_table,
    labels_of,
    setup_distributed,
    train_one_epoch,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root with train/ and val/ (or test/)")
    p.add_argument("--data-dir", default=None, help="same as the positional data argument")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default=None, help="default: val/ if present, else test/")
    p.add_argument("--max-train-samples", type=int, default=0, help="fixed random subset of the training set")
    p.add_argument("--max-val-samples", type=int, default=0, help="fixed random subset of the validation set")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (local cache or file)")
    p.add_argument("--initial-checkpoint", default="", help="plain timm checkpoint to start from")
    p.add_argument("--resume", default="", help="checkpoint-last.pth of an earlier run")
    p.add_argument("--num-classes", type=int, default=None, help="default: classes of the training folder")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--opt", default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--sched", default="cosine")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (timm's; e.g. 0.65)")
    p.add_argument("--grad-checkpointing", action="store_true", help="timm's gradient checkpointing")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    p.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CPU or CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="torchrun runs: a collective that waits this long for another rank fails and the job ends "
        "(default: torch's, 30 min); set it above the longest step, validation or checkpoint save",
    )
    p.add_argument("--output", default="work_dirs/train_timm")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sd = p.add_argument_group("self-distillation (sd_plugin.SelfDistillConfig; BYOT defaults)")
    sd.add_argument("--no-sd", action="store_true", help="train the plain model with the same recipe")
    sd.add_argument("--sd-exit-indices", type=int, nargs="+", default=None, help="stage/block indices of the exits")
    d = SelfDistillConfig()  # the defaults live in one place
    sd.add_argument("--sd-temperature", type=float, default=d.temperature)
    sd.add_argument("--sd-ce-weight", type=float, default=d.ce_weight)
    sd.add_argument("--sd-kd-weight", type=float, default=d.kd_weight)
    sd.add_argument("--sd-hint-weight", type=float, default=d.hint_weight)
    sd.add_argument("--sd-hint-form", choices=("mean", "rms", "squared"), default=d.hint_form)
    sd.add_argument("--sd-deepest-weight", type=float, default=d.deepest_weight)
    sd.add_argument("--sd-exit-hidden-ratio", type=float, default=d.exit_hidden_ratio)
    sd.add_argument("--sd-no-exits", action="store_true", help="no exits: a teacher-free method below alone")
    sd.add_argument(
        "--sd-warmup-epochs", type=int, default=0, help="ramp the KD and hint weights from 0 over these epochs"
    )
    sd.add_argument(
        "--pskd", type=float, nargs="?", const=0.8, default=0.0, metavar="ALPHA", help="PS-KD, final weight (0.8)"
    )
    sd.add_argument(
        "--cs-kd",
        type=float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="WEIGHT",
        help="CS-KD with its class-pair sampler, weight (1.0); needs an even --batch-size",
    )
    sd.add_argument(
        "--tfkd", type=float, nargs="?", const=0.1, default=0.0, metavar="WEIGHT", help="Tf-KD-reg, weight (0.1)"
    )
    sd.add_argument(
        "--zipf",
        type=float,
        nargs="?",
        const=0.1,
        default=0.0,
        metavar="WEIGHT",
        help="Zipf's label smoothing, weight (0.1; the authors use 1.0 on TinyImageNet and iNat21)",
    )
    sd.add_argument("--zipf-power", type=float, default=d.zipf_power, help="Zipf's LS exponent (1.0)")
    args = p.parse_args(argv)
    args.data = args.data or args.data_dir
    if not args.data:
        p.error("give the data root (positional) or --data-dir")
    if args.val_split is None:
        args.val_split = "val" if os.path.isdir(os.path.join(args.data, "val")) else "test"
    if args.no_sd and (args.pskd or args.cs_kd or args.tfkd or args.zipf or args.sd_no_exits):
        p.error("--no-sd trains the plain model with cross-entropy; for a method alone use --sd-no-exits instead")
    if args.cs_kd and args.batch_size % 2:
        p.error(f"--cs-kd needs an even --batch-size (pairs of samples), got {args.batch_size}")
    return args


def create_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """timm.create_model at --img-size when the model takes an img_size, else its own size."""
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


def seed_epoch(seed: int, epoch: int, rank: int, loader: torch.utils.data.DataLoader) -> None:
    """Seed every random source from (seed, epoch, rank), so a resumed run repeats the epochs it re-runs exactly."""
    epoch_seed = seed + 1000 * epoch + rank
    random.seed(epoch_seed)
    np.random.seed(epoch_seed % 2**32)
    torch.manual_seed(epoch_seed)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)


RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "epoch")


def _load_resume_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint-last.pth of an earlier run, or a ValueError that says what the file is instead."""
    check_checkpoint_file(path, "--resume", pattern="checkpoint-*.pth")
    ckpt = load_checkpoint_file(
        path, "--resume", mmengine_objects=False
    )  # data only: a crafted file is refused, its code never runs
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(
            f"--resume {path!r} is not a checkpoint of tools/train_timm.py (no {missing}): resume from the "
            "checkpoint-last.pth of an earlier run; to start from plain timm weights use --initial-checkpoint."
        )
    return ckpt


def wrap_ddp(net: torch.nn.Module, info: Any) -> DistributedDataParallel:
    """The tool's DDP wrapper (torch's defaults: ``broadcast_buffers=True``, no ``find_unused_parameters``).

    Validation runs on rank 0 alone, over the whole validation set: DDP keeps the parameters identical on every
    rank and, with ``broadcast_buffers=True``, every forward starts from rank 0's BatchNorm buffers, so rank 0
    holds the model all ranks train; sharding validation would give the same numbers, only sooner.
    """
    return DistributedDataParallel(net, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def average_over_ranks(stats: Dict[str, Any], info: Any) -> Dict[str, Any]:
    """Epoch loss and loss terms averaged over the ranks (each rank trains on its own shard), per-rank losses kept."""
    if not info.distributed:
        return stats
    names = sorted(stats["terms"])
    local = torch.tensor([stats["loss"], *(stats["terms"][k] for k in names)], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(info.world_size)]
    dist.all_gather(gathered, local)
    mean = torch.stack(gathered).mean(dim=0).tolist()
    return dict(stats, loss=mean[0], terms=dict(zip(names, mean[1:])), loss_per_rank=[g[0].item() for g in gathered])


def main(argv: Optional[List[str]] = None) -> int:
    """Run the tool; the process group is destroyed however the run ends (success, error, SIGTERM)."""

    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    info = setup_distributed(args.device, args.dist_timeout)
    torch.manual_seed(args.seed + info.rank)
    os.makedirs(args.output, exist_ok=True)

    probe, _ = build_dataset(args.data, args.train_split, transform=None, max_samples=0, seed=args.seed)
    num_classes = args.num_classes or len(probe.reader.class_to_idx)  # type: ignore[attr-defined]
    model = create_model(args, num_classes)
    config = sd_config(args)
    size = (3, args.img_size, args.img_size) if args.img_size else None
    net: torch.nn.Module = model if args.no_sd else sd_plugin.SelfDistillModel(model, config, size)
    if args.grad_checkpointing:
        net.set_grad_checkpointing(True)  # type: ignore[operator]
    data_cfg = resolve_data_config(dict(input_size=size) if size else {}, model=net)
    train_set, _ = build_dataset(
        args.data, args.train_split, create_transform(**data_cfg, is_training=True), args.max_train_samples, args.seed
    )
    val_set, _ = build_dataset(
        args.data, args.val_split, create_transform(**data_cfg, is_training=False), args.max_val_samples, args.seed
    )
    if args.pskd:
        train_set = WithIndex(train_set)  # PS-KD keys its past predictions by data-set index
    pairs = ClassPairIndexSampler(labels_of(train_set), info.rank, info.world_size, args.seed) if args.cs_kd else None
    train_loader = build_loader(train_set, args.batch_size, True, args.workers, info, args.seed, sampler=pairs)
    val_loader = build_loader(val_set, args.batch_size, False, args.workers, info, args.seed)

    net.to(info.device)
    if args.no_sd:
        criterion: Any = lambda out, y: soft_cross_entropy(out, y, args.smoothing if y.dim() == 1 else 0.0)  # noqa: E731
    else:
        criterion = sd_plugin.SelfDistillLoss(config, label_smoothing=args.smoothing)
    optimizer = create_optimizer_v2(
        net,
        opt=args.opt,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        layer_decay=args.layer_decay,
    )
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr
    )
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=num_classes
        )

    start_epoch, history = 0, []
    if args.resume:
        ckpt = _load_resume_checkpoint(args.resume)
        net.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"], ckpt.get("history", [])
        if "criterion" in ckpt and isinstance(criterion, torch.nn.Module):
            criterion.load_state_dict(ckpt["criterion"])  # PS-KD's past predictions
    train_net: torch.nn.Module = wrap_ddp(net, info) if info.distributed else net

    if info.is_main and args.initial_checkpoint and not args.no_sd and not args.resume:
        print(
            f"loaded the timm model's weights from {args.initial_checkpoint}; the exits start from their "
            "initialisation (they are not in a plain checkpoint)",
            flush=True,
        )
    if info.is_main:
        exits = "none (--no-sd)" if args.no_sd else [p.module for p in net.exit_points]  # type: ignore[union-attr]
        print(
            f"{args.model}: {num_classes} classes, input {tuple(data_cfg['input_size'])}, exits at {exits}, "
            f"{len(train_set)} train / {len(val_set)} val images, world size {info.world_size}",
            flush=True,
        )
    table: List[Tuple[int, Dict[str, float]]] = [(h["epoch"], h["top1"]) for h in history]
    for epoch in range(start_epoch, num_epochs):
        if isinstance(train_loader.sampler, (torch.utils.data.DistributedSampler, ClassPairIndexSampler)):
            train_loader.sampler.set_epoch(epoch)
        if isinstance(criterion, sd_plugin.SelfDistillLoss):
            criterion.set_progress(epoch / num_epochs)  # PS-KD's growing weight
            if args.sd_warmup_epochs > 0:
                criterion.set_distill_scale(min(1.0, epoch / args.sd_warmup_epochs))
        seed_epoch(args.seed, epoch, info.rank, train_loader)
        t0 = time.time()
        stats = train_one_epoch(
            train_net,
            train_loader,
            criterion,
            optimizer,
            info,
            args.amp,
            mixup,
            not args.no_progress,
            f"epoch {epoch + 1}",
        )
        stats = average_over_ranks(stats, info)
        scheduler.step(epoch + 1)
        if info.is_main:
            top1 = evaluate(net, val_loader, info, args.amp, with_exits=not args.no_sd)
            history.append(dict(epoch=epoch + 1, top1=top1, epoch_seconds=round(time.time() - t0, 2), **stats))
            table.append((epoch + 1, top1))
            print(
                f"\nepoch {epoch + 1}/{num_epochs}  loss {stats['loss']:.4f}  "
                f"step {1000 * stats['step_time_mean']:.1f} ms\n{format_table(table)}",
                flush=True,
            )
            _save(args, net, optimizer, scheduler, epoch + 1, history, criterion)
        if info.distributed:
            dist.barrier()
    if info.distributed:
        dist.destroy_process_group()
    return 0


def _save(
    args: argparse.Namespace,
    net: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    epoch: int,
    history: List[Dict[str, Any]],
    criterion: Any = None,
) -> None:
    state = dict(
        epoch=epoch,
        arch=args.model,
        state_dict=net.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        args=vars(args),
        history=history,
    )
    if isinstance(criterion, torch.nn.Module):
        state["criterion"] = criterion.state_dict()  # PS-KD's past predictions (the same on every rank)
    atomic_save(state, os.path.join(args.output, "checkpoint-last.pth"))
    plain = net if args.no_sd else sd_plugin.unwrap(net)
    atomic_save(plain.state_dict(), os.path.join(args.output, "model_plain.pth"))
    if not args.no_sd:
        net.save_exits(args.output, safe_serialization=False)  # type: ignore[operator] # exits.pth + its config
    with atomic_write(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(dict(args=vars(args), epochs=history), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
