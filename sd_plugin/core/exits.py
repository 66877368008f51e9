"""Exit blocks: from an intermediate feature map to pooled features of the deepest width.

The convolutional exit follows BYOT's bottleneck branch (Zhang et al., 2019): one
k x k convolution of stride k that brings the map to the deepest stage's
resolution, then a 1x1 convolution to the deepest stage's width, each with BN and
ReLU, then global average pooling. Unlike BYOT's branch (1x1, k x k/k, 1x1), the
strided convolution comes first, so nothing runs at the tapped map's full
resolution: the same exits cost a small fraction of the time and activation
memory (see the README's Results). Maps already at the deepest resolution get
1x1, 3x3 and 1x1 convolutions. Token backbones get a per-token MLP followed
by mean pooling over tokens. The classifier is kept separate so each framework
can build its own (a Linear for timm, the user's head config for MMPretrain).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["ConvExit", "TokenExit", "VectorExit", "build_exit", "FEATURE_FORMATS"]

FEATURE_FORMATS: Tuple[str, ...] = ("NCHW", "NHWC", "NLC", "NC")


def _hidden(out_features: int, hidden_ratio: float) -> int:
    return max(8, int(round(out_features * hidden_ratio)))


class ConvExit(nn.Module):
    """NCHW (or NHWC) map -> (N, out_features) pooled features.

    Args:
        in_channels: Channels of the tapped feature map.
        out_features: Width of the deepest classifier's input features.
        stride: Downsampling factor from the tapped map to the deepest map.
        hidden_ratio: Bottleneck width relative to ``out_features``.
        channels_last: Input is NHWC (e.g. timm Swin stages).
    """

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        stride: int = 1,
        hidden_ratio: float = 0.25,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}.")
        hidden = _hidden(out_features, hidden_ratio)
        self.channels_last = channels_last
        self.stride = stride
        if stride > 1:
            # Downsample first: the k x k, stride-k convolution reads the input channels directly,
            # so no layer runs at the tapped (full) resolution with more channels than it has.
            layers = [
                nn.Conv2d(in_channels, hidden, kernel_size=stride, stride=stride, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        else:
            layers = [
                nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, out_features, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_features),
            nn.ReLU(inplace=True),
        ]
        self.block = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ConvExit expects a 4-D feature map, got shape {tuple(x.shape)}.")
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        if self.stride > 1 and min(x.shape[-2:]) < self.stride:
            # A map smaller than the strided kernel (an input smaller than the one the exit was
            # built for): enlarge it so the kernel fits rather than failing.
            x = nn.functional.interpolate(x, size=(self.stride, self.stride), mode="nearest")
        return self.pool(self.block(x)).flatten(1)


class VectorExit(nn.Module):
    """(N, C) vectors (e.g. a class token) -> (N, out_features): LayerNorm and a two-layer MLP."""

    def __init__(self, in_channels: int, out_features: int, hidden_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = _hidden(out_features, hidden_ratio)
        self.norm = nn.LayerNorm(in_channels)
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.GELU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"VectorExit expects (N, C) vectors, got shape {tuple(x.shape)}.")
        return self.mlp(self.norm(x))


class TokenExit(VectorExit):
    """NLC tokens -> (N, out_features): the same LayerNorm and MLP per token, then the mean over tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"TokenExit expects (N, L, C) tokens, got shape {tuple(x.shape)}.")
        return self.mlp(self.norm(x)).mean(dim=1)


def build_exit(
    fmt: str,
    in_channels: int,
    out_features: int,
    stride: int = 1,
    hidden_ratio: float = 0.25,
) -> nn.Module:
    """The exit block for a feature of layout ``fmt`` (one of :data:`FEATURE_FORMATS`)."""
    if fmt == "NCHW":
        return ConvExit(in_channels, out_features, stride, hidden_ratio)
    if fmt == "NHWC":
        return ConvExit(in_channels, out_features, stride, hidden_ratio, channels_last=True)
    if fmt == "NLC":
        return TokenExit(in_channels, out_features, hidden_ratio)
    if fmt == "NC":
        return VectorExit(in_channels, out_features, hidden_ratio)
    raise ValueError(f"unknown feature layout {fmt!r}; expected one of {FEATURE_FORMATS}.")
