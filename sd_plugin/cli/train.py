"""``sd-plugin train``: train an MMPretrain config (with or without self-distillation) through mmengine's Runner.

The command line is MMPretrain's ``tools/train.py``; on GPUs it behaves the same.
What it adds:

- ``sd_plugin`` is imported, so configs need no ``custom_imports`` to use
  ``model=dict(type='SelfDistillClassifier')``.
- ``torchrun --nproc_per_node=N -m sd_plugin train CONFIG --launcher pytorch``
  also works on CPU-only machines (gloo process group, DDP without device ids).
- ``--amp`` on a CPU-only machine trains under bfloat16 autocast
  (``CPUAutocastOptimWrapper``; mmengine's ``AmpOptimWrapper`` needs a GPU).
- Data loaders with ``num_workers=0`` get ``persistent_workers=False`` (PyTorch
  refuses persistent workers without workers; MMPretrain's script forces True).
- Exact resume: ``RNGStateHook`` is added (``--no-rng-state-hook`` leaves it out), so a
  resumed run repeats the uninterrupted one bitwise, shuffling and augmentation included.
- Crash-safe checkpoints: the ``CheckpointHook`` writes through the ``'sd_atomic_local'``
  file backend (temporary file, then rename) unless the config names a backend; ``--resume``
  refuses a damaged checkpoint with a message naming it and the newest intact one.
- Clean exit: data-loader workers are stopped and the process group is destroyed on
  success, on error and on SIGTERM (exit code 143), so a finished DDP run exits with code 0.
- FSDP: ``ResumableFSDPStrategy`` is registered (``FSDPStrategy`` whose resume works on current
  torch; ``runner_type='FlexibleRunner'``), and ``--resume`` takes a sharded checkpoint (a folder
  of ``rank{i}.pth``), each shard checked as a checkpoint file is.
- A rank that hangs: ``env_cfg.dist_cfg.timeout`` (seconds, mmengine's setting; default 1800)
  bounds how long the other ranks wait in a collective before the job fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import os.path as osp
from copy import deepcopy
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .._io import check_checkpoint_file
from ._load import help_kwargs
from ._signals import sigterm_exits

if TYPE_CHECKING:
    from mmengine.config import Config
    from mmengine.runner import Runner

__all__ = ["add_parser", "run", "parse_args", "main", "merge_args", "build_runner", "clean_shutdown"]

EPILOG = """examples:
  sd-plugin train configs/resnet18_cifar10_sd.py --work-dir work_dirs/r18
  sd-plugin train CONFIG --amp                 # GPU: float16 AmpOptimWrapper; CPU: bfloat16 autocast
  sd-plugin train CONFIG --resume              # the work dir's latest checkpoint (or --resume FILE)
  sd-plugin train CONFIG --cfg-options load_from=plain.pth train_cfg.max_epochs=10
  # DDP: NCCL on GPUs, gloo processes on a CPU-only machine
  torchrun --nproc_per_node=2 -m sd_plugin train CONFIG --launcher pytorch --amp
"""


class _DictAction(argparse.Action):
    """mmengine's ``DictAction`` (``key=value`` pairs, values parsed as Python literals), imported when used."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        from mmengine.config import DictAction

        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """MMPretrain's ``tools/train.py`` arguments."""
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
        action=_DictAction,
        help="override config settings, key=value (e.g. train_cfg.max_iters=100)",
    )
    parser.add_argument(
        "--no-rng-state-hook",
        action="store_true",
        help="leave out RNGStateHook (then resume is exact only without random augmentation and shuffling)",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none", help="job launcher")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def add_parser(sub: Any) -> None:
    summary = "train an MMPretrain config through mmengine's Runner (CPU DDP, exact resume, safe checkpoints)"
    p = sub.add_parser("train", help=summary, **help_kwargs(__doc__, EPILOG))
    add_arguments(p)
    p.set_defaults(run=run)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options of ``sd-plugin train ARGV`` (``argv`` without the command words)."""
    parser = argparse.ArgumentParser(prog="sd-plugin train", **help_kwargs(__doc__, EPILOG))
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sd-plugin train ARGV`` in this process; errors are raised (the command line prints them)."""
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Build the config from ``args`` and train it; 0 once training has finished."""
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if not osp.isfile(args.config):
        raise ValueError(f"config file {args.config!r} does not exist; give the path of an MMPretrain config (.py).")
    from mmengine.config import Config

    cfg = merge_args(Config.fromfile(args.config), args)
    with clean_shutdown() as holder:
        runner = build_runner(cfg)
        holder.append(runner)
        runner.train()
    return 0


def _dataloader_defaults(cfg: Config, field: str, args: argparse.Namespace) -> None:
    from mmengine.config import ConfigDict

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
    """Apply the command line to ``cfg`` (MMPretrain's rules, plus the CPU fixes of this command)."""
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
        if not osp.exists(args.resume):
            raise ValueError(
                f"--resume {args.resume!r}: no such checkpoint file. Give an existing .pth file, or --resume "
                "without a path to resume from the latest checkpoint in the work dir."
            )
        _check_checkpoint(args.resume, "--resume")
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
    if not args.no_rng_state_hook:
        _add_rng_state_hook(cfg)
    _atomic_checkpoints(cfg)
    _check_final(cfg)
    if args.resume == "auto":
        _check_latest_checkpoint(cfg.work_dir)
    return cfg


def _add_rng_state_hook(cfg: Config) -> None:
    from ..mmpretrain_adapter.rng_state_hook import RNGStateHook

    hooks = list(cfg.get("custom_hooks", None) or [])
    if not any(h.get("type") in ("RNGStateHook", RNGStateHook) for h in hooks):
        hooks.append(dict(type="RNGStateHook"))
    cfg.custom_hooks = hooks


def _atomic_checkpoints(cfg: Config) -> None:
    """Local checkpoints through the crash-safe backend, unless the config chose a backend or a remote out_dir."""
    from .._mmengine_backend import ATOMIC_BACKEND

    ckpt = cfg.get("default_hooks", {}).get("checkpoint", None)
    if not ckpt or ckpt.get("backend_args") is not None or ckpt.get("file_client_args") is not None:
        return
    out_dir = ckpt.get("out_dir", None)
    if out_dir is not None and "://" in str(out_dir):
        return
    ckpt["backend_args"] = dict(backend=ATOMIC_BACKEND)


def _check_latest_checkpoint(work_dir: str) -> None:
    """``--resume`` without a path: refuse a damaged latest checkpoint, naming it and the newest intact one."""
    from mmengine.runner import find_latest_checkpoint

    latest = find_latest_checkpoint(work_dir) if osp.isdir(work_dir) else None
    if latest:
        _check_checkpoint(latest, "--resume: the latest checkpoint")


def _check_checkpoint(path: str, option: str) -> None:
    """A checkpoint file, or a sharded one (FSDP: a folder of ``rank{i}.pth``, each of them checked)."""
    if not osp.isdir(path):
        check_checkpoint_file(path, option)
        return
    shards = sorted(f for f in os.listdir(path) if f.startswith("rank") and f.endswith(".pth"))
    if not shards:
        raise ValueError(
            f"{option} {path!r} is a folder without rank*.pth files: give a checkpoint file, or the folder a "
            "sharded (FSDP) run saved."
        )
    for shard in shards:
        check_checkpoint_file(osp.join(path, shard), option)


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
    """``Runner.from_cfg`` (or the config's ``runner_type``), after CPU DDP set-up where needed.

    Registers sd_plugin's training components first: ``CPUAutocastOptimWrapper`` (what ``--amp`` picks on CPU)
    and ``ResumableFSDPStrategy``.
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from .. import _amp  # noqa: F401  (registers CPUAutocastOptimWrapper)
    from .._dist import prepare_mmengine_cpu_ddp
    from ..mmpretrain_adapter import fsdp_strategy  # noqa: F401  (registers ResumableFSDPStrategy)

    prepare_mmengine_cpu_ddp(cfg)
    if "runner_type" not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


@contextlib.contextmanager
def clean_shutdown() -> Iterator[List[Any]]:
    """Stop data-loader workers and destroy the process group when the block ends, however it ends.

    SIGTERM (what torchrun and schedulers send) becomes ``SystemExit(143)`` so the
    same clean-up runs. Without it, the interpreter tears the gloo process group
    down during its own shutdown, which can abort rank 0 after a finished run.
    Yields a list; put the runner in it so its loaders' workers are stopped.
    """
    holder: List[Any] = []
    ok = False
    with sigterm_exits() as leaving:
        try:
            yield holder
            ok = True
        finally:
            leaving()
            _clean_up(holder, ok)


def _clean_up(holder: List[Any], ok: bool) -> None:
    """Stop the runner's data-loader workers and destroy the process group (after a barrier when the run ended well)."""
    for runner in holder:
        _stop_loader_workers(runner)
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()  # every rank has finished before any rank tears the group down
        dist.destroy_process_group()


def _stop_loader_workers(runner: Runner) -> None:
    for name in ("_train_loop", "_val_loop", "_test_loop"):
        loader = getattr(getattr(runner, name, None), "dataloader", None)
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            loader._iterator = None  # type: ignore[union-attr]
