"""What the MMPretrain adapter tells the core exit engine (private machinery).

The engine (:mod:`sd_plugin.core.engine`) finds the backbone's main path and
stages from one probe pass on its own; the adapter only checks user-given
``stage_modules``, picks the probe input size and makes sure the backbone
trains with autograd (:func:`plain_backprop_for_exits`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.logging import print_log

from sd_plugin.core import get_submodule

__all__ = ["check_stage_modules", "probe_input_shape", "plain_backprop_for_exits", "DEFAULT_PROBE_SIZE"]

#: Probe input size when neither ``probe_size`` nor the backbone's ``img_size`` says otherwise.
DEFAULT_PROBE_SIZE = 64


def check_stage_modules(backbone: nn.Module, stage_modules: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    """User-given stage modules (dotted names relative to the backbone, the last one feeding the head), checked."""
    if stage_modules is None:
        return None
    if isinstance(stage_modules, str) or not all(isinstance(n, str) for n in stage_modules):
        raise TypeError(f"stage_modules must be a list of module names, got {stage_modules!r}.")
    if len(stage_modules) < 2:
        raise ValueError(f"stage_modules needs at least two stages (exits go before the last), got {stage_modules}.")
    for name in stage_modules:
        get_submodule(backbone, name)
    return tuple(stage_modules)


def probe_input_shape(backbone: nn.Module, probe_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    """(channels, height, width) of the probe input.

    Channels come from the backbone's first convolution (3 when it has none);
    the size from ``probe_size``, else the backbone's declared ``img_size``,
    else :data:`DEFAULT_PROBE_SIZE` (small, so the probe is cheap; strides are
    ratios of map sizes and do not depend on it).
    """
    in_chans = 3
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            in_chans = m.in_channels
            break
    size: Any = probe_size
    if size is None:
        size = getattr(backbone, "img_size", None)
    if size is None:
        size = getattr(getattr(backbone, "patch_embed", None), "init_input_size", None)
    if size is None:
        size = DEFAULT_PROBE_SIZE
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, str) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"probe_size must be an int or (height, width), got {probe_size!r}.")
    h, w = (int(s) for s in size)
    if min(h, w) < 1:
        raise ValueError(f"probe_size must be positive, got {probe_size!r}.")
    return in_chans, h, w


def plain_backprop_for_exits(backbone: nn.Module) -> bool:
    """Train a reversible backbone with plain backprop, so the exits' losses reach it; True when switched.

    MMPretrain's ``RevVisionTransformer`` trains with reversible backprop by default: its layers run inside one
    custom ``autograd.Function`` that recomputes activations in the backward pass, so a layer's output carries no
    gradient and an exit reading it could never train the layers before it. Its ``no_custom_backward=True`` runs the
    same layers, in the same order and with the same random draws, under autograd: the same forward values and the
    same gradients, at the cost of keeping the layers' activations (more training memory). Inference is unchanged
    (both paths are the same in eval mode). Logged as a warning, with how to say so in the config.
    """
    if getattr(backbone, "no_custom_backward", None) is not False:
        return False
    setattr(backbone, "no_custom_backward", True)  # noqa: B010 - an attribute of that backbone, not of nn.Module
    print_log(
        f"{type(backbone).__name__}: training with plain backprop instead of reversible backprop "
        "(backbone.no_custom_backward=True), because the exits read the outputs of its layers and reversible "
        "backprop computes them outside autograd. Same values and gradients; training keeps the layers' "
        "activations (more memory). Set backbone.no_custom_backward=True in the config to silence this warning.",
        logger="current",
        level=logging.WARNING,
    )
    return True
