"""What the MMPretrain adapter tells the core exit engine (private machinery).

The engine (:mod:`sd_plugin.core.engine`) finds the backbone's main path and
stages from one probe pass on its own; the adapter only checks user-given
``stage_modules``, picks the probe input size, measures the head in the same
pass (:func:`discover_exits`) and makes sure the backbone trains with autograd
(:func:`plain_backprop_for_exits`).
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log

from sd_plugin.core import ExitPoint, get_submodule
from sd_plugin.core.engine import ProbeError, find_exit_layout

from ._heads import HeadProbe, probe_head

__all__ = [
    "check_stage_modules",
    "discover_exits",
    "probe_input_shape",
    "plain_backprop_for_exits",
    "DEFAULT_PROBE_SIZE",
]

_STAGE_FIX = (
    "Name its main-path stage modules with SelfDistillClassifier(stage_modules=['layer1', 'layer2', ...]) (each "
    "one's output feeding the next, the last one feeding the neck/head), or choose exit_indices."
)
# Probe sizes tried when the default (small) probe input does not fit the backbone (too small; LeNet: 32 only).
_FALLBACK_PROBE_SIZES = (224, 32)

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
    same layers, in the same order and with the same random draws, under autograd: the same forward values, and
    gradients equal up to float rounding (stored rather than recomputed activations), at the cost of keeping the
    layers' activations (more training memory). Inference is unchanged (both paths are the same in eval mode).
    Logged as a warning, with how to say so in the config.
    """
    if getattr(backbone, "no_custom_backward", None) is not False:
        return False
    setattr(backbone, "no_custom_backward", True)  # noqa: B010 - an attribute of that backbone, not of nn.Module
    print_log(
        f"{type(backbone).__name__}: training with plain backprop instead of reversible backprop "
        "(backbone.no_custom_backward=True), because the exits read the outputs of its layers and reversible "
        "backprop computes them outside autograd. Same values, and gradients equal up to float rounding; "
        "training keeps the layers' activations (more memory). Set backbone.no_custom_backward=True in the config "
        "to silence this warning.",
        logger="current",
        level=logging.WARNING,
    )
    return True


def discover_exits(
    model: Any, stage_modules: Optional[Sequence[str]], probe_size: Optional[Union[int, Sequence[int]]]
) -> Tuple[List[ExitPoint], int, HeadProbe]:
    """Place the exits of an ``ImageClassifier``-like ``model`` through the core exit engine.

    One probe pass of its backbone, neck and head (``model.extract_feat`` then ``model.head``) gives the exit
    points, the number of main-path positions and the head's measured widths (:class:`HeadProbe`). Without
    ``probe_size``, input sizes the backbone does not take are followed by 224 and 32 px.
    """
    names = check_stage_modules(model.backbone, stage_modules)
    chans, h, w = probe_input_shape(model.backbone, probe_size)  # type: ignore[arg-type]
    probed: List[HeadProbe] = []

    def run(x: torch.Tensor) -> Any:
        feats = model.extract_feat(x)
        try:
            probed.append(probe_head(model.head, feats))
        except RuntimeError as e:  # not the input size: the head does not fit the features
            raise ValueError(_head_mismatch(model.head, feats, e)) from e
        return feats

    sizes = [(h, w)] if probe_size is not None else [(h, w), *((s, s) for s in _FALLBACK_PROBE_SIZES if s != h)]
    for i, (ph, pw) in enumerate(sizes):
        try:
            layout = find_exit_layout(
                model.backbone,
                run,
                (chans, ph, pw),
                model.sd_config,
                owner=model,
                candidates=names,
                user_given=names is not None,
                name=f"backbone {type(model.backbone).__name__}",
                fix=_STAGE_FIX,
            )
            return list(layout.points), layout.num_positions, probed[-1]
        except ProbeError as e:  # an input size this backbone does not take: try the next one
            if i == len(sizes) - 1:
                tried = ", ".join(f"{a}x{b}" for a, b in sizes)
                raise ValueError(
                    f"the probe forward pass of {type(model.backbone).__name__} failed at {tried} ({e}); set "
                    "SelfDistillClassifier(probe_size=...) to an input size this backbone accepts."
                ) from e
    raise AssertionError("unreachable")  # pragma: no cover


def _head_mismatch(head: Any, feats: Any, error: RuntimeError) -> str:
    """Message for a head whose ``in_channels`` does not fit the backbone/neck output (seen in the probe pass)."""
    last = feats[-1] if isinstance(feats, (tuple, list)) and feats else feats
    shape = tuple(last.shape) if isinstance(last, torch.Tensor) else type(last).__name__
    width = f" ({last.shape[1]})" if isinstance(last, torch.Tensor) and last.dim() >= 2 else ""
    return (
        f"head {type(head).__name__} (in_channels={getattr(head, 'in_channels', '?')}) cannot take the "
        f"backbone/neck output of shape {shape}: {error}. Set head.in_channels to the feature width{width}."
    )
