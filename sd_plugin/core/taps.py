"""Reading intermediate features through forward hooks (kept for compatibility).

The exit engine (:mod:`sd_plugin.core.engine`) owns exit points and the hooks that
read them; this module re-exports its point type and offers :class:`FeatureTaps`,
a one-off context manager on top of :class:`~sd_plugin.core.engine.ExitEngine`.
"""

from __future__ import annotations

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
        self._engine: Optional[ExitEngine] = None
        self._capture: Optional[Capture] = None
        self._ctx = None

    def __enter__(self) -> FeatureTaps:
        self._engine = ExitEngine(self.model, self.points)
        self._ctx = self._engine.capture()  # type: ignore[assignment]
        self._capture = self._ctx.__enter__()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)  # type: ignore[unreachable]
        if self._engine is not None:
            self._engine.remove()
        self._ctx = None

    @property
    def features(self) -> List[torch.Tensor]:
        if self._capture is None:
            raise RuntimeError("FeatureTaps.features is available inside or after the 'with' block.")
        return self._capture.features
