"""Training and inference cost of self-distillation against the plain model (route-agnostic: the routes build arms):
step time and inference latency interleaved in one process, peak memory in fresh processes, and FLOPs of the plain
forward and of every exit from its tapped feature (the floor any implementation of the exits pays).
"""

from __future__ import annotations

import functools
import gc
import importlib
import multiprocessing as mp
import operator
import resource
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from sd_plugin.deploy import _timing
from sd_plugin.deploy.flops import count_call_flops


@dataclass
class TrainArm:
    """One arm, ready to run: ``step`` is one optimisation step on a batch, ``infer`` the eval-mode prediction of the
    deepest classifier (exits unused); ``inputs(batch)`` is what the backbone sees and ``forward`` maps it to the
    deepest logits (FLOPs). A self-distillation arm's ``model`` implements ``MultiExitModel``."""

    name: str
    model: nn.Module
    step: Callable[[Any], object]
    infer: Callable[[Any], object]
    inputs: Callable[[Any], torch.Tensor] = operator.itemgetter(0)  # (images, labels) batches
    forward: Optional[Callable[[torch.Tensor], Any]] = None  # None: the model itself

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model


def interleaved_times(
    arms: Sequence[TrainArm], batches: Sequence[Any], rounds: int, warmup: int, mode: str
) -> Dict[str, List[float]]:
    """Seconds per call of every arm, in ABBA order on the same batch each round (sd_plugin's timer), ``rounds``
    after ``warmup``: ``mode`` 'train' calls ``arm.step`` in train mode, 'infer' ``arm.infer`` in eval mode, no grad."""
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}.")
    if not batches:
        raise ValueError("no batches to time.")
    for arm in arms:
        arm.model.train(mode == "train")
    calls = {a.name: (a.step if mode == "train" else a.infer) for a in arms}
    fns = {name: (lambda i, fn=fn: fn(batches[i % len(batches)])) for name, fn in calls.items()}
    with torch.set_grad_enabled(mode == "train"):
        return _timing.interleaved_times(fns, rounds, warmup)


def proc_status_mib(field: str) -> Optional[float]:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _memory_child(route: str, spec: Dict[str, Any], arm: str, num_batches: int, steps: int) -> Dict[str, Any]:
    module = importlib.import_module(route)
    batches = module.sample_batches(spec, num_batches)
    gc.collect()
    try:  # reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        rss = proc_status_mib("VmRSS")
    except OSError:
        rss = None
    if rss is not None:
        before, method = rss, "VmHWM after reset (/proc/self/clear_refs) minus VmRSS before the build"
    else:
        before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss growth"
    train_arm: TrainArm = module.build_arm(spec, arm)
    train_arm.model.train()
    for i in range(steps):
        train_arm.step(batches[i % len(batches)])
    peak = proc_status_mib("VmHWM") if rss is not None else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    return {"mib": peak - before, "method": method}


def probe_peak_memory(route: str, spec: Dict[str, Any], arm: str, num_batches: int = 2, steps: int = 3) -> Dict:
    """Peak-RSS growth (MiB) of building ``arm`` and training it ``steps`` steps, in a fresh spawned process.

    ``{'mib': growth, 'method': how it was read}``: the peak-RSS mark is reset through ``/proc/self/clear_refs`` right
    before ``build_arm(spec, arm)`` of the ``route`` module where the kernel allows it, else ``ru_maxrss`` growth.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return dict(pool.submit(_memory_child, route, spec, arm, num_batches, steps).result())


def _flops(model: nn.Module, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """Forward FLOPs of ``fn(x)``, the whole batch, in eval mode without gradients (sd_plugin's FLOP counter)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        total = count_call_flops(model, fn, x)[0]
    model.train(was_training)
    return int(total)


def exit_flops(
    plain: nn.Module, plain_forward: Callable[[torch.Tensor], torch.Tensor], sd: nn.Module, x: torch.Tensor
) -> Dict[str, Any]:
    """Forward GFLOPs per image of the plain model (``plain_forward``: its forward to logits), of the deepest path of
    ``sd`` (a ``MultiExitModel``) and of each exit, on the preprocessed batch ``x``; and the training-forward ratio."""
    from sd_plugin.core import MultiExitModel
    from sd_plugin.deploy.early_exit import forward_with_features

    if not isinstance(sd, MultiExitModel):
        raise TypeError(f"{type(sd).__name__} does not implement sd_plugin.core.MultiExitModel.")
    mx: Any = sd  # an nn.Module that implements MultiExitModel
    was_training = sd.training
    with torch.no_grad():
        feats = forward_with_features(mx.eval(), x)[1]
    sd.train(was_training)
    per_exit = [_flops(sd, functools.partial(mx.forward_exit, k), f) for k, f in enumerate(feats)]
    plain_f, deepest_f, n = _flops(plain, plain_forward, x), _flops(sd, mx.forward_deepest, x), x.shape[0] * 1e9
    return {
        "plain_gflops_per_image": plain_f / n,
        "sd_deepest_gflops_per_image": deepest_f / n,
        "exit_gflops_per_image": [f / n for f in per_exit],
        "sd_train_forward_gflops_per_image": (deepest_f + sum(per_exit)) / n,
        "flops_ratio": (deepest_f + sum(per_exit)) / plain_f,
    }


def flops_ratio(base: TrainArm, arm: TrainArm, x: torch.Tensor) -> float:
    """Training-forward FLOPs of an arm (model and exits) over the plain model's, on the preprocessed batch ``x``."""
    from sd_plugin.core import MultiExitModel

    if isinstance(arm.model, MultiExitModel):
        return float(exit_flops(base.model, base.forward, arm.model, x)["flops_ratio"])
    return _flops(arm.model, arm.forward, x) / _flops(base.model, base.forward, x)
