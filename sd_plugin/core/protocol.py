"""What inference and export tools need from a model with exits, whatever its framework.

Both adapters (timm's ``SelfDistillModel`` and MMPretrain's
``SelfDistillClassifier``) implement :class:`MultiExitModel`, so early-exit
inference, truncation and the per-exit report are written once, here in plain
torch, against this interface.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn

from .engine import ExitEngine, ExitPoint

__all__ = ["MultiExitModel"]


@runtime_checkable
class MultiExitModel(Protocol):
    """A classifier with exits read through forward hooks.

    ``exit_points[k]`` is relative to :meth:`tapped_module`; hooking it during
    :meth:`forward_deepest` yields the feature that exit ``k`` (0-based,
    shallowest first) reads, and a forward hook there may return a smaller
    batch (the samples that go on) or raise :class:`~sd_plugin.core.StopForward`.

    Optional: a ``multi_label`` attribute, True for a classifier with a sigmoid
    per class (early exit and calibration then refuse it; absent means False).
    """

    @property
    def exit_points(self) -> Sequence[ExitPoint]: ...

    @property
    def exit_engine(self) -> ExitEngine:
        """The taps on :meth:`tapped_module`'s exit points (capture, run to exit k, intercept)."""
        ...

    @property
    def num_exits(self) -> int: ...

    def tapped_module(self) -> nn.Module:
        """The module whose submodules ``exit_points`` name (e.g. the timm model, the MMPretrain backbone)."""
        ...

    def forward_deepest(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the unmodified model (deepest classifier), (N, num_classes)."""
        ...

    def forward_exit(self, k: int, feature: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of exit ``k`` (0-based) from its tapped feature."""
        ...
