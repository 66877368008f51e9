"""What the MMPretrain adapter tells the core exit engine (private machinery).

The engine (:mod:`sd_plugin.core.engine`) finds the backbone's main path and
stages from one probe pass on its own; the adapter only checks user-given
``stage_modules`` and picks the probe input size.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch.nn as nn

from sd_plugin.core import get_submodule

__all__ = ["check_stage_modules", "probe_input_shape", "DEFAULT_PROBE_SIZE"]

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
