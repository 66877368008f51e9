"""Training and inference cost of self-distillation, measured side by side with the plain model.

Method (route-agnostic; the routes build the arms):

* **Step time**: both arms live in one process and take training steps on the
  *same* batches, alternating in ABBA order (plain, sd, sd, plain, ...) so that
  neither arm systematically runs first; after warm-up, the median of each
  arm's step times and the median of the per-pair ratios are reported.
* **Peak memory**: each arm runs in a fresh spawned process. After importing
  torch and receiving the batches, the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``) and the RSS read; after building the model and
  optimiser and ``steps`` training steps the peak RSS (``VmHWM``) is read. The
  growth is that arm's training memory (weights, gradients, optimiser state,
  activations, allocator overhead). Without ``/proc``: ``ru_maxrss`` growth.
  Repeated, median taken.
* **FLOPs**: mmengine's jit-based ``FlopAnalyzer`` (fvcore convention, one
  multiply-add = 1 FLOP) on the plain model's forward, and on every exit's
  forward from its tapped feature (the :class:`~sd_plugin.core.MultiExitModel`
  protocol). Training forward of model + exits over model alone is the floor
  that any implementation of that exit design pays.
* **Inference**: eval mode, deepest prediction (exits unused) against the plain
  model on the same batches, interleaved, medians.
"""

from __future__ import annotations

import functools
import gc
import importlib
import multiprocessing as mp
import resource
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from sd_plugin.deploy import _timing
from sd_plugin.deploy.flops import count_call_flops

__all__ = ["TrainArm", "interleaved_times", "probe_peak_memory", "exit_flops", "flops_of", "summarise_pairs"]


@dataclass
class TrainArm:
    """One arm of the benchmark, ready to run.

    Attributes:
        name: The arm's name (``tools.bench.arms``).
        model: The model (the self-distillation arm's implements ``MultiExitModel``).
        step: One optimisation step (forward, loss, backward, optimiser) on a batch.
        infer: Eval-mode prediction on a batch (deepest classifier, exits unused).
        optimizer: The optimiser (an mmengine ``OptimWrapper`` on the MMPretrain route), for profiling.
    """

    name: str
    model: nn.Module
    step: Callable[[Any], object]
    infer: Callable[[Any], object]
    optimizer: Any = None


def interleaved_times(
    arms: Sequence[TrainArm],
    batches: Sequence[Any],
    rounds: int,
    warmup: int,
    mode: str,
) -> Dict[str, List[float]]:
    """Seconds per call of every arm, alternating arms in ABBA order on identical batches (sd_plugin's timer).

    Args:
        arms: The arms to compare (usually plain and sd).
        batches: Batches cycled through; each round feeds the same batch to every arm.
        rounds: Measured rounds (one call per arm each).
        warmup: Unmeasured rounds first.
        mode: 'train' (``arm.step``, model in train mode) or 'infer' (``arm.infer``, eval mode, no grad).
    """
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


def summarise_pairs(times: Dict[str, List[float]], num: str = "sd", den: str = "plain") -> Dict[str, float]:
    """Medians of both arms, their ratio, and the median of the per-round ratios."""
    a, b = times[num], times[den]
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same, non-zero number of timings for {num!r} and {den!r}.")
    return {
        f"{den}_median_s": statistics.median(b),
        f"{num}_median_s": statistics.median(a),
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
        "median_pair_ratio": statistics.median(x / y for x, y in zip(a, b)),
    }


def _proc_status_mib(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_child(route: str, spec: Dict[str, Any], arm: str, num_batches: int, steps: int) -> Dict[str, Any]:
    module = importlib.import_module(route)
    batches = module.sample_batches(spec, num_batches)
    gc.collect()
    exact = _reset_peak_rss()
    rss = _proc_status_mib("VmRSS")
    if exact and rss is not None:
        before, method = rss, "VmHWM after reset (/proc/self/clear_refs) minus VmRSS before the build"
    else:
        before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss growth"
    train_arm: TrainArm = module.build_arm(spec, arm)
    train_arm.model.train()
    for i in range(steps):
        train_arm.step(batches[i % len(batches)])
    peak = _proc_status_mib("VmHWM") if exact else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    return {"mib": peak - before, "method": method}


def probe_peak_memory(
    route: str,
    spec: Dict[str, Any],
    arm: str,
    num_batches: int = 2,
    steps: int = 3,
) -> Dict[str, Any]:
    """Peak-RSS growth (MiB) of building ``arm`` and training it ``steps`` steps, in a fresh process.

    Returns ``{'mib': growth, 'method': how it was read}``: the peak-RSS mark is reset through
    ``/proc/self/clear_refs`` right before the build where the kernel allows it (so imports and
    unpickling do not mask the peak), else ``ru_maxrss`` growth is used.

    Args:
        route: Name of the route module (``tools.bench.mmpretrain_route`` or
            ``tools.bench.timm_route``), importable in the child (it inherits ``sys.path``); its
            ``sample_batches(spec, n)`` loads the batches (before the measurement starts) and
            ``build_arm(spec, arm)`` builds the arm.
        spec: Route specification of the arm.
        arm: The arm's name.
        num_batches: Batches loaded and cycled through.
        steps: Training steps.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return dict(pool.submit(_memory_child, route, spec, arm, num_batches, steps).result())


def flops_of(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Forward FLOPs of ``forward(x)`` (eval mode, no grad), the whole batch (sd_plugin's FLOP counter)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        total = count_call_flops(model, forward, x)[0]
    model.train(was_training)
    return int(total)


def exit_flops(
    plain: nn.Module, plain_forward: Callable[[torch.Tensor], torch.Tensor], sd: nn.Module, x: torch.Tensor
) -> Dict[str, Any]:
    """Forward FLOPs of the plain model, of the sd model's deepest path, and of each exit.

    Args:
        plain: The plain model.
        plain_forward: Its forward to logits (e.g. ``lambda x: model(x, mode='tensor')``).
        sd: The self-distillation model (``MultiExitModel``).
        x: A preprocessed input batch (N, 3, H, W); FLOPs are reported per image.
    """
    from sd_plugin.core import MultiExitModel
    from sd_plugin.deploy.early_exit import forward_with_features

    if not isinstance(sd, MultiExitModel):
        raise TypeError(f"{type(sd).__name__} does not implement sd_plugin.core.MultiExitModel.")
    mx: Any = sd  # an nn.Module that implements MultiExitModel
    was_training = (plain.training, sd.training)
    plain.eval()
    sd.eval()
    n = x.shape[0]
    with torch.no_grad():
        plain_f = count_call_flops(plain, plain_forward, x)[0]
        deepest_f = count_call_flops(sd, mx.forward_deepest, x)[0]
        feats = forward_with_features(mx, x)[1]
        per_exit = [count_call_flops(sd, functools.partial(mx.forward_exit, k), f)[0] for k, f in enumerate(feats)]
    plain.train(was_training[0])
    sd.train(was_training[1])
    total = deepest_f + sum(per_exit)
    return {
        "plain_gflops_per_image": plain_f / n / 1e9,
        "sd_deepest_gflops_per_image": deepest_f / n / 1e9,
        "exit_gflops_per_image": [f / n / 1e9 for f in per_exit],
        "sd_train_forward_gflops_per_image": total / n / 1e9,
        "flops_ratio": total / plain_f,
    }
