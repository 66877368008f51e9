"""Reading intermediate features from any torch model through forward hooks.

An :class:`ExitPoint` names a module on the model's main path whose output (or
input, for ``hook='forward_pre'``) is the feature an exit reads. Hooks leave the
model's own forward untouched, so the model computes exactly what it computed
before; the same points let early-exit inference stop the forward part-way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .exits import FEATURE_FORMATS

__all__ = ["ExitPoint", "FeatureTaps", "StopForward", "select_feature", "get_submodule"]


@dataclass(frozen=True)
class ExitPoint:
    """Where an exit reads its feature.

    Attributes:
        module: Dotted name of the module (relative to the tapped model).
        fmt: Layout of the feature: 'NCHW', 'NHWC', 'NLC' or 'NC'.
        channels: Channels (C) of the feature.
        stride: Downsampling factor from this feature to the deepest feature map.
        output_index: When the module returns a tuple or list, the element that
            holds the feature (None: the output is the tensor itself).
        hook: 'forward' (the module's output) or 'forward_pre' (its input).
    """

    module: str
    fmt: str
    channels: int
    stride: int = 1
    output_index: Optional[int] = None
    hook: str = "forward"

    def __post_init__(self) -> None:
        if self.fmt not in FEATURE_FORMATS:
            raise ValueError(f"unknown feature layout {self.fmt!r}; expected one of {FEATURE_FORMATS}.")
        if self.hook not in ("forward", "forward_pre"):
            raise ValueError(f"hook must be 'forward' or 'forward_pre', got {self.hook!r}.")


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (truncated and early-exit inference)."""


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the model and the missing module."""
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(
            f"{type(model).__name__} has no submodule {name!r} to read exit features from ({e})."
        ) from None


def select_feature(value: Any, point: ExitPoint) -> torch.Tensor:
    """The feature tensor inside a hooked module's output (or input tuple)."""
    if point.output_index is not None:
        value = value[point.output_index]
    elif isinstance(value, (tuple, list)) and point.hook == "forward_pre":
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"module {point.module!r} gave a {type(value).__name__}, not a tensor; set output_index "
            "to the element that holds the feature."
        )
    return value


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
        self._values: Dict[int, torch.Tensor] = {}
        self._handles: List[Any] = []

    def __enter__(self) -> FeatureTaps:
        self._values.clear()
        for i, point in enumerate(self.points):
            module = get_submodule(self.model, point.module)
            if point.hook == "forward_pre":
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(i, point)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(i, point)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int, point: ExitPoint) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._values[i] = select_feature(output, point)

        return hook

    def _pre_hook(self, i: int, point: ExitPoint) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._values[i] = select_feature(args, point)

        return hook

    @property
    def features(self) -> List[torch.Tensor]:
        missing = [p.module for i, p in enumerate(self.points) if i not in self._values]
        if missing:
            raise RuntimeError(
                f"the forward pass never ran the tapped module(s) {missing}: they are not on this "
                "model's forward path. Choose other exit indices."
            )
        return [self._values[i] for i in range(len(self.points))]
