"""Exit points: where on a model's main path an exit reads its feature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = [
    "ExitPoint",
    "StopForward",
    "select_feature",
    "replace_feature",
    "get_submodule",
    "tap_module",
    "FEATURE_FORMATS",
]

from ..exits import FEATURE_FORMATS  # 'NLC' also takes channels-last token groups (N, L, h, w, C), flattened


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
        shrinkable: A hook here may hand on fewer samples (what early exit does). False where the model's later
            code needs the whole batch (e.g. Twins-SVT reshapes with the input's batch size): an exit there still
            trains and predicts, but early exit cannot skip later stages for the samples it answered.
        copy: The model writes into this output later, in place (TNT): the tap keeps a copy, so the exit reads the
            module's output, not what later layers made of it.
    """

    module: str
    fmt: str
    channels: int
    stride: int = 1
    output_index: Optional[int] = None
    hook: str = "forward"
    shrinkable: bool = True
    copy: bool = False

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


def tap_module(model: nn.Module, point: ExitPoint) -> nn.Module:
    """The module whose hook sees ``point``'s feature: the named module, or for a plain ``nn.Sequential`` its
    last (for a pre-hook: first) child, recursively. A Sequential's output is its last child's output, and that
    child also runs when the container's forward does not: timm's gradient checkpointing
    (``checkpoint_seq(..., flatten=True)``: ResNet, EfficientNet) calls the blocks of each stage directly."""
    module = get_submodule(model, point.module)
    while type(module) is nn.Sequential and len(module) > 0:
        module = module[0] if point.hook == "forward_pre" else module[-1]
    return module


def select_feature(value: Any, point: ExitPoint) -> torch.Tensor:
    """The feature tensor inside a hooked module's output (or input tuple), in ``point.fmt``."""
    if point.output_index is not None:
        value = value[point.output_index]
    elif isinstance(value, (tuple, list)) and point.hook == "forward_pre":
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"module {point.module!r} gave a {type(value).__name__}, not a tensor; set output_index "
            "to the element that holds the feature."
        )
    if point.fmt == "NLC" and value.dim() > 3:
        value = value.flatten(1, -2)
    return value


def replace_feature(value: Any, point: ExitPoint, new: torch.Tensor) -> Any:
    """``value`` (a hooked module's output, or its input tuple for a pre-hook) with the tensor that
    :func:`select_feature` reads there replaced by ``new`` (in the value's own layout): what a hook returns to hand
    ``new`` on instead."""
    index = point.output_index
    if index is None and isinstance(value, (tuple, list)) and point.hook == "forward_pre":
        index = 0
    old = value if index is None else value[index] if isinstance(value, (tuple, list)) else None
    if not isinstance(old, torch.Tensor):
        raise TypeError(
            f"module {point.module!r} gives a {type(value).__name__} without a tensor at the feature's place, so no "
            "feature can be handed on there; set output_index to the element that holds the feature."
        )
    if point.fmt == "NLC" and old.dim() > 3 and new.dim() == 3:
        new = new.reshape(new.shape[0], *old.shape[1:])  # select_feature flattened the token groups
    if index is None:
        return new
    items = list(value)
    items[index] = new
    return tuple(items) if isinstance(value, tuple) else items
