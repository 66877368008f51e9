"""Train an MMPretrain config (with or without self-distillation) through mmengine's Runner.

The command line is MMPretrain's ``tools/train.py``; on GPUs it behaves the same.
What it adds:

- ``sd_plugin`` is imported, so configs need no ``custom_imports`` to use
  ``model=dict(type='SelfDistillClassifier')``.
- ``torchrun --nproc_per_node=N tools/train.py CONFIG --launcher pytorch``
  also works on CPU-only machines (gloo process group, DDP without device ids).
- ``--amp`` on a CPU-only machine trains under bfloat16 autocast
  (``CPUAutocastOptimWrapper``; mmengine's ``AmpOptimWrapper`` needs a GPU).
- Data loaders with ``num_workers=0`` get ``persistent_workers=False`` (PyTorch
  refuses persistent workers without workers; MMPretrain's script forces True).

Example:
    python tools/train.py configs/resnet18_sd_cifar10.py --work-dir work_dirs/r18
    torchrun --nproc_per_node=2 tools/train.py CONFIG --launcher pytorch --amp
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
from copy import deepcopy
from typing import List, Optional, Sequence

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import sd_plugin  # noqa: F401  (registers SelfDistillClassifier & co., safe globals for resume)
import sd_plugin._amp  # noqa: F401  (registers CPUAutocastOptimWrapper)
from sd_plugin._dist import prepare_mmengine_cpu_ddp
from sd_plugin._io import check_checkpoint_file


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """MMPretrain's ``tools/train.py`` arguments."""
    parser = argparse.ArgumentParser(description="Train a model (MMPretrain config, mmengine Runner)")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument(
        "--resume",
        nargs="?",
        type=str,
        const="auto",
        help="resume from this checkpoint; without a path, from the latest checkpoint in the work dir",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: AmpOptimWrapper (float16, dynamic loss scale) on GPU, bfloat16 autocast on CPU",
    )
    parser.add_argument("--no-validate", action="store_true", help="do not evaluate during training")
    parser.add_argument("--auto-scale-lr", action="store_true", help="scale the lr by the actual batch size")
    parser.add_argument("--no-pin-memory", action="store_true", help="pin_memory=False in all data loaders")
    parser.add_argument(
        "--no-persistent-workers", action="store_true", help="persistent_workers=False in all data loaders"
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings, key=value (e.g. train_cfg.max_iters=100)",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none", help="job launcher")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def _dataloader_defaults(cfg: Config, field: str, args: argparse.Namespace) -> None:
    loader = cfg.get(field, None)
    if loader is None:
        return
    merged = ConfigDict(pin_memory=True, persistent_workers=True, collate_fn=dict(type="default_collate"))
    merged.update(deepcopy(loader))
    if args.no_pin_memory:
        merged["pin_memory"] = False
    if args.no_persistent_workers:
        merged["persistent_workers"] = False
    cfg[field] = merged


def _enable_amp(cfg: Config) -> None:
    optim_wrapper = cfg.get("optim_wrapper", None)
    if optim_wrapper is None:
        raise ValueError("--amp needs an `optim_wrapper` in the config; add optim_wrapper=dict(optimizer=...).")
    if torch.cuda.is_available():
        optim_wrapper.type = "AmpOptimWrapper"
        optim_wrapper.setdefault("loss_scale", "dynamic")
    else:
        optim_wrapper.type = "CPUAutocastOptimWrapper"
        optim_wrapper.pop("loss_scale", None)
        optim_wrapper.setdefault("dtype", "bfloat16")


def merge_args(cfg: Config, args: argparse.Namespace) -> Config:
    """Apply the command line to ``cfg`` (MMPretrain's rules, plus the CPU fixes of this script)."""
    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        _enable_amp(cfg)
    if args.resume == "auto":
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise ValueError(
                f"--resume {args.resume!r}: no such checkpoint file. Give an existing .pth file, or --resume "
                "without a path to resume from the latest checkpoint in the work dir."
            )
        check_checkpoint_file(args.resume, "--resume")
        cfg.resume = True
        cfg.load_from = args.resume
    if args.auto_scale_lr:
        if cfg.get("auto_scale_lr", None) is None:
            raise ValueError("--auto-scale-lr needs `auto_scale_lr=dict(base_batch_size=...)` in the config.")
        cfg.auto_scale_lr.enable = True
    for field in ("train_dataloader", "val_dataloader", "test_dataloader"):
        _dataloader_defaults(cfg, field, args)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    _check_final(cfg)
    return cfg


def _check_final(cfg: Config) -> None:
    """Fixes and checks on the finished config (after --cfg-options, which may change any of it)."""
    for field in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(field, None)
        if loader is not None and loader.get("num_workers", 0) == 0:
            loader["persistent_workers"] = False  # PyTorch refuses persistent workers without workers
    if cfg.get("optim_wrapper", {}).get("type") == "AmpOptimWrapper" and not torch.cuda.is_available():
        raise ValueError(
            "optim_wrapper type='AmpOptimWrapper' needs a GPU (mmengine refuses it on CPU). On a CPU-only machine "
            "use type='CPUAutocastOptimWrapper' (bfloat16 autocast; what --amp picks there) or plain OptimWrapper."
        )


def build_runner(cfg: Config) -> Runner:
    """``Runner.from_cfg`` (or the config's ``runner_type``), after CPU DDP set-up where needed."""
    prepare_mmengine_cpu_ddp(cfg)
    if "runner_type" not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if not osp.isfile(args.config):
        raise ValueError(f"config file {args.config!r} does not exist; give the path of an MMPretrain config (.py).")
    cfg = merge_args(Config.fromfile(args.config), args)
    runner = build_runner(cfg)
    runner.train()


if __name__ == "__main__":
    main()
