"""``SelfDistillExitNeck``: the registered neck that turns a tapped feature into an exit's pooled features."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModule

from sd_plugin.core import build_exit

from ..registry import MODELS

__all__ = ["SelfDistillExitNeck"]


@MODELS.register_module()
class SelfDistillExitNeck(BaseModule):
    """Exit block of self-distillation (BYOT bottleneck, pooled), as an MMPretrain neck.

    A thin wrapper around :func:`sd_plugin.core.build_exit`: a feature map (or
    tokens) from an intermediate stage becomes ``(N, out_channels)`` features of
    the deepest classifier's width. Like MMPretrain's pooling necks it returns a
    one-element tuple, so any ``ClsHead`` consumes it. ``SelfDistillClassifier``
    builds these itself from a probe of the backbone; building one by hand is
    rarely needed.

    Args:
        in_channels: Channels of the tapped feature.
        out_channels: Width of the deepest head's input features.
        fmt: Layout of the tapped feature: 'NCHW', 'NHWC', 'NLC' or 'NC'.
        stride: Downsampling from the tapped map to the deepest map.
        hidden_ratio: Bottleneck width relative to ``out_channels``.
        init_cfg: mmengine initialisation config.

    Example:
        >>> neck = dict(type='SelfDistillExitNeck', in_channels=128,
        ...             out_channels=512, fmt='NCHW', stride=4)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        fmt: str = "NCHW",
        stride: int = 1,
        hidden_ratio: float = 0.25,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.fmt = fmt
        self.exit = build_exit(fmt, in_channels, out_channels, stride=stride, hidden_ratio=hidden_ratio)

    def forward(self, inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Tuple[torch.Tensor]:
        """``(features,)`` of shape (N, out_channels) from a tensor or a tuple whose last element is the feature."""
        x = inputs if isinstance(inputs, torch.Tensor) else inputs[-1]
        out = self.exit(x)
        if out.shape[1] != self.out_channels:
            raise ValueError(f"exit gave {tuple(out.shape)}, expected (N, {self.out_channels}).")
        return (out,)
