"""Wall-clock timing for the per-exit report: warm-up first, interleaved repeats, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping

import torch

__all__ = ["interleaved_medians"]


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of each function, calling them in turn in every repeat (noisy machines drift).

    Args:
        fns: Named zero-argument callables (each runs one measured unit of work).
        repeats: Timed rounds; each round calls every function once.
        warmup: Untimed rounds first.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    times: Dict[str, List[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
