"""Running the training commands (``sd-plugin train``, ``sd-plugin train-timm``) from tests: in-process (fast), as
a subprocess, or under torchrun (DDP)."""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from _rel_helpers import REPO, subprocess_env

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
#: The command words, after ``python`` or ``torchrun ...``: ``-m sd_plugin train`` / ``-m sd_plugin train-timm``.
TRAIN = ("-m", "sd_plugin", "train")
TRAIN_TIMM = ("-m", "sd_plugin", "train-timm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_tool(name: str) -> Any:
    """The module of a training command: ``'train'`` (``sd-plugin train``) or ``'train_timm'`` (``train-timm``)."""
    return importlib.import_module(f"sd_plugin.cli.{name}")


def run_mm_inprocess(config: Path, *args: str, name: str) -> None:
    """``sd-plugin train CONFIG ARGS`` in this process, with a unique experiment name (mmengine singletons)."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only fight over the shared cores
    try:
        load_tool("train").main([str(config), *args, "--cfg-options", f"experiment_name={name}"])
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def run_cmd(cmd: Sequence[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(cmd), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun(*args: str, nproc: int = 2, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun ... ARGS``: a script and its arguments, or ``*TRAIN`` / ``*TRAIN_TIMM`` and theirs."""
    cmd = [TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    return run_cmd(cmd, timeout=timeout, check=check)


def probe(work_dir: Path, rank: int = 0) -> Dict[str, Any]:
    """What ``ProbeHook`` recorded: losses per iteration, the final parameters and optimizer state."""
    info = json.loads((work_dir / f"probe_rank{rank}.json").read_text())
    info["params"] = torch.load(work_dir / f"probe_params_rank{rank}.pt", weights_only=True)
    info["optim"] = torch.load(work_dir / f"probe_optim_rank{rank}.pt", weights_only=False)
    return info


def max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def losses_of(info: Dict[str, Any], key: str = "loss") -> List[float]:
    return [r[key] for r in info["records"]]
