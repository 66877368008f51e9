"""Reading intermediate features through forward hooks (kept for compatibility).

The exit engine (:mod:`sd_plugin.core.engine`) owns exit points and the hooks that
read them; this module re-exports its point type and offers :class:`FeatureTaps`,
a one-off context manager on top of :class:`~sd_plugin.core.engine.ExitEngine`.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .engine import Capture, ExitEngine, ExitPoint, StopForward, get_submodule, select_feature

__all__ = ["ExitPoint", "FeatureTaps", "StopForward", "select_feature", "get_submodule"]


class FeatureTaps:
    """Context manager that records the features at ``points`` during a forward pass.

    Example:
        >>> with FeatureTaps(model, points) as taps:
        ...     logits = model(x)
        >>> feats = taps.features  # one tensor per point, in ``points`` order
    """

    def __init__(self, model: nn.Module, points: Sequence[ExitPoint]) -> None:
        self.model = model
        self.points = list(points)
        self._stack = contextlib.ExitStack()
        self._capture: Optional[Capture] = None

    def __enter__(self) -> FeatureTaps:
        engine = ExitEngine(self.model, self.points)
        self._stack.callback(engine.remove)
        self._capture = self._stack.enter_context(engine.capture())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def features(self) -> List[torch.Tensor]:
        if self._capture is None:
            raise RuntimeError("FeatureTaps.features is available inside or after the 'with' block.")
        return self._capture.features
