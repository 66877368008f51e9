"""``sd-plugin train-timm``: train a timm model with self-distillation exits (``sd_plugin.wrap``) on an ImageFolder.

Built on timm's own utilities (create_model, create_dataset, resolve_data_config/create_transform,
create_optimizer_v2, create_scheduler_v2, Mixup); flags follow timm's train.py. ``--no-sd`` trains the plain
model with the same recipe. Prints a per-exit top-1 table every epoch and writes to ``--output``:
``checkpoint-last.pth`` (wrapped model with exits, optimizer, scheduler: for ``--resume``),
``model_plain.pth`` (the unwrapped timm state dict, loads strictly into ``timm.create_model``),
``exits.pth`` (exit weights alone) with ``sd_plugin_config.json`` beside it (the exits' options:
``sd_plugin.load_exits(model, OUTPUT)`` reloads them) and ``summary.json`` (per-epoch metrics and step times).
Under ``torchrun`` it trains with DDP (nccl on GPUs, gloo on CPU), each rank on its own shard of the data.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .._io import atomic_save, atomic_write
from ..core import SelfDistillConfig, SelfDistillLoss, soft_cross_entropy
from ..core.methods import ClassPairIndexSampler
from ..timm_adapter import SelfDistillModel, unwrap
from ..timm_adapter._train_utils import (
    WithIndex,
    average_over_ranks,
    build_dataset,
    build_loader,
    create_model,
    evaluate,
    format_table,
    labels_of,
    load_resume_checkpoint,
    sd_config,
    seed_epoch,
    setup_distributed,
    train_one_epoch,
    wrap_ddp,
)
from ._load import help_kwargs
from ._signals import sigterm_exits

__all__ = ["add_parser", "run", "parse_args", "main", "train"]

#: What the ``sd-plugin`` parser adds to a subcommand's options; the run saves only its own (``args`` in the
#: checkpoint and summary.json).
CLI_KEYS = ("command", "run", "argv", "traceback")

EPILOG = """examples:
  sd-plugin train-timm demo_data/cifar10_mini --model resnet18 --img-size 32 --epochs 2 --output work_dirs/r18
  # the plain model with the same recipe (the baseline)
  sd-plugin train-timm demo_data/cifar10_mini --model resnet18 --img-size 32 --epochs 2 --no-sd --output work_dirs/plain
  # fine-tune a pretrained ViT with timm's layer decay and gradient checkpointing
  sd-plugin train-timm DATA --model vit_tiny_patch16_224 --pretrained --opt adamw --lr 1e-3 --layer-decay 0.65 \\
      --grad-checkpointing --output work_dirs/vit
  # DDP: one process per GPU (gloo processes on a CPU-only machine)
  torchrun --nproc_per_node=2 -m sd_plugin train-timm ~/.cache/sd_plugin/cifar10 --val-split test --model resnet18
  # go on from the last finished epoch of an earlier run
  sd-plugin train-timm DATA --model resnet18 --output work_dirs/r18 --resume work_dirs/r18/checkpoint-last.pth
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``sd-plugin train-timm`` (timm's train.py names, plus the self-distillation group)."""
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
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
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


def _finish_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """The defaults that depend on other options, and the combinations refused (a usage error of ``p``)."""
    args.data = args.data or args.data_dir
    if not args.data:
        p.error("give the data root (positional) or --data-dir")
    if args.val_split is None:
        args.val_split = "val" if os.path.isdir(os.path.join(args.data, "val")) else "test"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.no_sd and (args.pskd or args.cs_kd or args.tfkd or args.zipf or args.sd_no_exits):
        p.error("--no-sd trains the plain model with cross-entropy; for a method alone use --sd-no-exits instead")
    if args.cs_kd and args.batch_size % 2:
        p.error(f"--cs-kd needs an even --batch-size (pairs of samples), got {args.batch_size}")
    return args


def add_parser(sub: Any) -> None:
    summary = "train a timm model with self-distillation exits on an ImageFolder (under torchrun: DDP)"
    p = sub.add_parser("train-timm", help=summary, **help_kwargs(__doc__, EPILOG))
    add_arguments(p)
    p.set_defaults(run=functools.partial(run, parser=p))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options of ``sd-plugin train-timm ARGV`` (``argv`` without the command words)."""
    p = argparse.ArgumentParser(prog="sd-plugin train-timm", **help_kwargs(__doc__, EPILOG))
    add_arguments(p)
    return _finish_args(p.parse_args(argv), p)


def run(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """``sd-plugin train-timm``: the options as the ``sd-plugin`` parser read them (``parser``: its subparser)."""
    own = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in CLI_KEYS})
    if parser is None:
        parser = argparse.ArgumentParser(prog="sd-plugin train-timm")
    return train(_finish_args(own, parser))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sd-plugin train-timm ARGV`` in this process; errors are raised (the command line prints them)."""
    return train(parse_args(argv))


def train(args: argparse.Namespace) -> int:
    """Train; the process group is destroyed however the run ends (success, error, SIGTERM: exit code 143)."""

    with sigterm_exits() as leaving:
        try:
            return _train(args)
        finally:
            leaving()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    from timm.data import Mixup, create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    info = setup_distributed(args.device, args.dist_timeout)
    torch.manual_seed(args.seed + info.rank)
    os.makedirs(args.output, exist_ok=True)

    probe, _ = build_dataset(args.data, args.train_split, transform=None, max_samples=0, seed=args.seed)
    num_classes = args.num_classes or len(probe.reader.class_to_idx)  # type: ignore[attr-defined]
    model = create_model(args, num_classes)
    config = sd_config(args)
    size = (3, args.img_size, args.img_size) if args.img_size else None
    net: torch.nn.Module = model if args.no_sd else SelfDistillModel(model, config, size)
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
        criterion = SelfDistillLoss(config, label_smoothing=args.smoothing)
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
        ckpt = load_resume_checkpoint(args.resume)
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
            f"{len(train_set)} train / {len(val_set)} val images, world size {info.world_size}",  # type: ignore[arg-type]
            flush=True,
        )
    table: List[Tuple[int, Dict[str, float]]] = [(h["epoch"], h["top1"]) for h in history]
    for epoch in range(start_epoch, num_epochs):
        if isinstance(train_loader.sampler, (torch.utils.data.DistributedSampler, ClassPairIndexSampler)):
            train_loader.sampler.set_epoch(epoch)
        if isinstance(criterion, SelfDistillLoss):
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
    plain = net if args.no_sd else unwrap(net)
    atomic_save(plain.state_dict(), os.path.join(args.output, "model_plain.pth"))
    if not args.no_sd:
        net.save_exits(args.output, safe_serialization=False)  # type: ignore[operator] # exits.pth + its config
    with atomic_write(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(dict(args=vars(args), epochs=history), f, indent=1)
