"""Process-group set-up: the one place that starts torch.distributed from torchrun's environment.

:func:`init_process_group_from_env` serves both training routes (``sd-plugin train`` on CPU processes, and
``sd-plugin train-timm`` through :func:`sd_plugin.timm_adapter._train_utils.setup_distributed`).

It also lets mmengine's ``launcher='pytorch'`` train on CPU-only machines.
mmengine's own launcher (``mmengine.dist.init_dist``) calls
``torch.cuda.set_device`` and wraps the model with ``device_ids=[LOCAL_RANK]``,
both of which fail without a GPU. On a CPU-only machine we therefore initialise
the gloo process group ourselves from torchrun's environment variables before
``Runner.from_cfg`` (mmengine then sees an initialised group and skips its own
launcher) and ask for ``MMDistributedDataParallel`` without device ids. With
GPUs the mmengine route uses none of this: mmengine behaves exactly as it always does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "MM_LAUNCH", "read_dist_env", "init_process_group_from_env", "prepare_mmengine_cpu_ddp"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

CPU_DDP_WRAPPER = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)


@dataclass(frozen=True)
class DistEnv:
    """Rank information that torchrun (or ``torch.distributed.launch``) puts in the environment."""

    rank: int
    local_rank: int
    world_size: int


#: What needs torchrun's variables and how to start it under torchrun (``sd-plugin train``'s words by default).
MM_LAUNCH = (
    "--launcher pytorch",
    "Start it with `torchrun --nproc_per_node=N -m sd_plugin train CONFIG --launcher pytorch`, or use "
    "--launcher none for a single process.",
)


def read_dist_env(launch: Tuple[str, str] = MM_LAUNCH) -> DistEnv:
    """Read torchrun's variables; raise a ValueError that says how to launch when they are missing.

    Args:
        launch: (what needs the variables, how to start it) for that error.
    """
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        what, how = launch
        raise ValueError(f"{what} needs the variables torchrun sets, but {missing} are not set. {how}")
    try:
        env = DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    except ValueError:
        raise ValueError(
            "RANK, LOCAL_RANK and WORLD_SIZE must be integers, got "
            f"{[os.environ[v] for v in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')]}."
        ) from None
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={env.world_size}).")
    return env


def init_process_group_from_env(
    backend: Optional[str] = None, timeout_s: Optional[float] = 1800.0, launch: Tuple[str, str] = MM_LAUNCH
) -> DistEnv:
    """Initialise the default process group from torchrun's ``env://`` variables (idempotent).

    Args:
        backend: ``'gloo'`` or ``'nccl'``; default nccl with CUDA, gloo without.
        timeout_s: Collective timeout in seconds (None: torch's default for the backend).
        launch: How to start the job, for the error when torchrun's variables are missing (:func:`read_dist_env`).
    """
    env = read_dist_env(launch)
    if dist.is_initialized():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs; use backend 'gloo' on a CPU-only machine.")
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
    )
    return env


def prepare_mmengine_cpu_ddp(cfg: Any) -> bool:
    """Make an mmengine config with ``launcher='pytorch'`` train on CPU processes.

    Does nothing (returns False) when CUDA is available or the launcher is not
    ``'pytorch'``. Otherwise initialises the gloo group and fills in a
    ``model_wrapper_cfg`` without device ids (a user-given wrapper config keeps
    its other settings; only ``device_ids`` is forced to None). Returns True
    when it prepared CPU DDP.

    Args:
        cfg: An ``mmengine.Config`` (anything with mapping access and ``get``).
    """
    if cfg.get("launcher", "none") != "pytorch" or torch.cuda.is_available():
        return False
    timeout = cfg.get("env_cfg", {}).get("dist_cfg", {}).get("timeout", 1800)
    init_process_group_from_env("gloo", float(timeout))
    wrapper = cfg.get("model_wrapper_cfg", None)
    if wrapper is None:
        cfg["model_wrapper_cfg"] = dict(CPU_DDP_WRAPPER)
    else:
        wrapper["device_ids"] = None
        wrapper.setdefault("broadcast_buffers", False)
    return True
