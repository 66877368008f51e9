"""Wall-clock timing, one helper for the report, the benchmarks and the soak test: interleaved rounds, medians.

Shared machines drift (other jobs, frequency scaling), so functions compared with each other are called in turn
within every round, and the order alternates (ABBA: forward on even rounds, reversed on odd ones) so no function
always runs right after the same other one.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

__all__ = ["interleaved_times", "medians", "interleaved_medians", "BATCH_TIMED", "timed_inputs", "each"]

BATCH_TIMED = 32  # the batch size of the "batch 32" figures


def interleaved_times(
    fns: Mapping[str, Callable[[int], object]], rounds: int, warmup: int = 1, prime: bool = False
) -> Dict[str, List[float]]:
    """Seconds of every call of each function, ``rounds`` measured rounds after ``warmup`` unmeasured ones.

    Args:
        fns: Named callables taking the round index (e.g. to pick that round's batch, the same for every function).
        rounds: Measured rounds; each calls every function once.
        warmup: Unmeasured rounds first.
        prime: Call each function once more, unmeasured, right before its measured call, so that whatever ran
            before it in the round (another model, another runtime) does not leave it cold caches to pay for.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}.")
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else reversed(names):
            if prime:
                fns[name](i)
            start = time.perf_counter()
            fns[name](i)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def medians(times: Mapping[str, List[float]]) -> Dict[str, float]:
    """The median of each function's times."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, prime: bool = False
) -> Dict[str, float]:
    """Median seconds of each zero-argument function under ``torch.inference_mode`` (see :func:`interleaved_times`)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")

    def ignore_round(fn: Callable[[], object]) -> Callable[[int], object]:
        return lambda _round: fn()

    with torch.inference_mode():
        return medians(interleaved_times({n: ignore_round(f) for n, f in fns.items()}, repeats, warmup, prime))


def timed_inputs(images: torch.Tensor, b1_images: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The inputs of the batch-1 and batch-32 figures: the first ``b1_images`` images one by one, and one batch of
    :data:`BATCH_TIMED` images (``images`` repeated when there are fewer)."""
    reps = (BATCH_TIMED + len(images) - 1) // len(images)
    b32 = images.repeat(reps, *([1] * (images.dim() - 1)))[:BATCH_TIMED]
    return [x[None] for x in images[:b1_images]], b32


def each(net: Callable[[Any], object], inputs: Sequence[Any]) -> Callable[[], object]:
    """One timed unit of work: ``net`` on every input in turn (tensors or arrays), waiting for a GPU to finish."""

    def run() -> object:
        out = [net(x) for x in inputs]
        if inputs and getattr(inputs[0], "is_cuda", False):
            torch.cuda.synchronize(inputs[0].device)
        return out

    return run
