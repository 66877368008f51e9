"""Checks of a training batch, shared by the adapters: fail on the first bad batch with a message that says why.

Without them a NaN pixel or an out-of-range label turns every weight into NaN a step later (NaN input) or
fails deep inside torch ("Target 5 is out of bounds", or a device-side assert on CUDA). Each check reads
one scalar back from the device, once per training step.
"""

from __future__ import annotations

import torch

__all__ = ["check_finite_input", "check_class_labels"]


def check_finite_input(inputs: torch.Tensor) -> None:
    """Raise ValueError when the (N, ...) input batch holds NaN or inf values."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        return
    if bool(torch.isfinite(inputs.sum(dtype=torch.float32))):  # one reduction; NaN and inf propagate into the sum
        return
    finite = torch.isfinite(inputs)
    if bool(finite.all()):  # the sum overflowed float32 (values near 1e38): not a NaN/inf input
        return
    per_sample = (~finite).flatten(1).any(dim=1) if inputs.dim() > 1 else ~finite
    bad = per_sample.nonzero().flatten().tolist()
    raise ValueError(
        f"the input batch contains NaN or inf values (sample(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} of "
        f"{inputs.shape[0]}). Check the data: a broken image file or transform, a Normalize std of 0, or "
        "inputs computed in float16 that overflowed."
    )


def check_class_labels(target: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError when integer class labels fall outside ``[0, num_classes - 1]`` (soft targets pass)."""
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dim() != 1 or not target.numel():
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, got min {low} and max {high}: "
            "check num_classes of the model's head against the data set's classes."
        )
