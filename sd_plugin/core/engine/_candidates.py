"""Pipeline step 2, the candidates: which module outputs can be exit features, and the main path through them.

Reads the traced call tree (:mod:`._probe`): the layout of each output (:func:`tensor_layout`: NCHW, NHWC, NLC
tokens, channels-last token groups), a :class:`Position` for each call that ran once and hands on a feature map or
tokens (:func:`position_of`), and the candidates in call order, either the adapter's named modules
(:func:`named_positions`) or the main path found from the call tree (:func:`main_path`, which asks the cut tests of
:mod:`._cuts` through a callback). :func:`dedupe` keeps one position per handed-on tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ._probe import Call, Probe

__all__ = ["Position", "tensor_layout", "position_of", "main_path", "named_positions", "dedupe"]

# The thresholds below were checked on one model per timm module and per MMPretrain family of the coverage runs
# (docs/results/coverage_*.md), the main-path walk also without timm's feature_info; each comment names the models
# whose placement changes without the rule.

#: A 4-D output is a map when its two spatial sides are the input's sides reduced by one common factor. A
#: non-square input has each side rounded on its own by strided layers (75 x 64 through two stride-2 convolutions:
#: 19 x 16, reduced 3.95x and 4x), so the two reductions may differ by this much, relative to the larger one: one
#: pixel of rounding on sides of 20 or more. Without it a channels-last map of a non-square input reads as
#: channels-first. The coverage runs probe square inputs, where both sides round alike: none of their placements
#: changes at 0 or at 0.2.
ASPECT_TOLERANCE = 0.05

#: The sizes of a feature with a single position: a (1, 1) map or one token.
SINGLE_POSITION = ((1, 1), (1,))

#: A call that ends at a single position from more than this many ends the main path (the head follows): a stage
#: downsamples 2x per side, 2 x 2 = 4 positions to 1 at most, so reducing more is pooling or a head-like layer. With
#: no limit, the main-path walk of CSATv2, EfficientViT-M1, LeViT-128S, SelecSLS-60 and SHViT-S1 (64 px) ends at
#: another module; at 1, their last stage (2 x 2 -> 1 x 1), SelecSLS-60's ``head.3`` or VGG-16's ``pre_logits`` is
#: cut off. 9 changes nothing.
STAGE_MAX_POSITIONS_TO_ONE = 4

#: A call whose class name contains this ends the main path at a single position whatever its input size: global
#: pooling of a map that is already small (2 x 2 at 64 px). Without it the main-path walk goes on into the head of
#: GhostNet, RepGhostNet, HardCoReNAS and LCNetV2 (``conv_head``), MobileNetV4 (``norm_head``), DLA (``fc``), DPN
#: (``classifier``), CAFormer (``head.norm``), FasterNet, LowFormer and StarNet: a head layer becomes the deepest
#: position.
POOL_CLASS_MARKER = "pool"

#: A cut whose children hand on at least this many resolutions other than its input's is a container of stages: the
#: path descends into it. Never descending leaves DenseNet-169's ``features`` one position (no placement), Xception41
#: placed by blocks and EfficientViM-M1 with one exit less (at 3 as well); descending at 1, into every downsampling
#: module, moves the stage ends of ConvNeXt, Swin, DenseNet, EdgeNeXt, HorNet, MobileNetV2, MobileViT, MViTv2, TinyViT
#: and Twins into their downsampling layers, and places EfficientNet and MobileNetV3 by blocks.
MIN_RESOLUTIONS_TO_DESCEND = 2


@dataclass(frozen=True)
class Position:
    """A main-path module and the feature it hands on."""

    name: str
    call: int
    fmt: str
    channels: int
    key: Tuple[int, ...]  # the distinct spatial positions (H*W) or token counts (L) of its batch-first features
    size: Tuple[int, ...]  # spatial (H, W) of a map, (L,) of tokens
    output_index: Optional[int]
    is_leaf: bool
    tensor_id: int

    def reduction(self, input_hw: Tuple[int, int]) -> float:
        """How much smaller than the input this feature is (per side)."""
        if len(self.size) == 2:
            return input_hw[0] / max(1, self.size[0])
        return math.sqrt(input_hw[0] * input_hw[1] / max(1, self.size[0]))

    def side(self) -> float:
        return float(self.size[0]) if len(self.size) == 2 else math.sqrt(max(1, self.size[0]))


def _spatial_like(h: int, w: int, input_hw: Tuple[int, int]) -> bool:
    """Whether (h, w) can be the input's (H, W) reduced by one common factor (within rounding)."""
    if h < 1 or w < 1 or h > input_hw[0] or w > input_hw[1]:
        return False
    rh, rw = input_hw[0] / h, input_hw[1] / w
    return abs(rh - rw) <= ASPECT_TOLERANCE * max(rh, rw)


def tensor_layout(
    t: torch.Tensor, input_hw: Tuple[int, int], channels_hint: Optional[int] = None, prefer_nhwc: bool = False
) -> Optional[Tuple[str, int, Tuple[int, ...]]]:
    """``(fmt, channels, size)`` of a batch-first feature tensor, or None for one an exit cannot read."""
    shape = tuple(int(s) for s in t.shape)
    if len(shape) == 2:
        return "NC", shape[1], ()
    if len(shape) == 3:
        return "NLC", shape[2], (shape[1],)
    if len(shape) == 4:
        nchw = _spatial_like(shape[2], shape[3], input_hw)
        nhwc = _spatial_like(shape[1], shape[2], input_hw)
        if channels_hint is not None:
            if shape[1] == channels_hint and shape[3] != channels_hint:
                nchw, nhwc = True, False
            elif shape[3] == channels_hint and shape[1] != channels_hint:
                nchw, nhwc = False, True
        if nhwc and (not nchw or prefer_nhwc):
            return "NHWC", shape[3], (shape[1], shape[2])
        return "NCHW", shape[1], (shape[2], shape[3])
    if len(shape) >= 5:  # channels-last token groups (HiViT): read as (N, L, C) with L the product
        return "NLC", shape[-1], (math.prod(shape[1:-1]),)
    return None


def _positions_in(t: torch.Tensor, input_hw: Tuple[int, int], channels_hint: Optional[int], prefer_nhwc: bool) -> int:
    """Number of spatial positions (H*W) or tokens (L) of a feature tensor: comparable across layouts."""
    lay = tensor_layout(t, input_hw, channels_hint, prefer_nhwc)
    return math.prod(lay[2]) if lay is not None else -1


def position_of(probe: Probe, idx: int, channels: Mapping[str, int], prefer_nhwc: bool) -> Optional[Position]:
    """The :class:`Position` of call ``idx`` if it ran once and hands on a feature map or tokens."""
    call = probe.calls[idx]
    if probe.times_called.get(call.name, 0) != 1 or call.end < 0:
        return None
    input_hw = probe.input_shape[-2], probe.input_shape[-1]
    feats = [(i, t) for i, t in call.outputs if t.dim() >= 3]
    if not feats or call.cls == "Unfold":  # nn.Unfold gives channels-first (N, C*k*k, L) patches: no exit feature
        return None
    index, tensor = feats[-1]  # several (multi-branch stages): the last, lowest-resolution one
    lay = tensor_layout(tensor, input_hw, channels.get(call.name), prefer_nhwc)
    if lay is None:
        return None
    # The resolutions present, once each: a new branch at a new resolution starts a stage (HRNet), a second stream
    # at the same one does not (RevViT's two halves).
    key = tuple(dict.fromkeys(_positions_in(t, input_hw, channels.get(call.name), prefer_nhwc) for _, t in feats))
    return Position(call.name, idx, lay[0], lay[1], key, lay[2], index, call.is_leaf, id(tensor))


def _pools_to_a_point(call: Call, pos: Position, positions_in: int) -> bool:
    """A call that reduces a map or tokens to a single position: global pooling, or a head-like layer that shrinks
    more than a stage does (> 2x per side). The main path ends there (the head follows)."""
    if pos.size not in SINGLE_POSITION:
        return False
    return positions_in > 1 and (POOL_CLASS_MARKER in call.cls.lower() or positions_in > STAGE_MAX_POSITIONS_TO_ONE)


def _input_key(call: Call, probe: Probe, channels_hint: Optional[int], prefer_nhwc: bool) -> int:
    """Positions (H*W or L) of a call's input, -1 when unknown."""
    if call.input_shape is None or len(call.input_shape) < 3:
        return -1
    input_hw = probe.input_shape[-2], probe.input_shape[-1]
    return _positions_in(torch.empty(call.input_shape, device="meta"), input_hw, channels_hint, prefer_nhwc)


def _after_functional_pool(pos: Position, positions_in: int, prev: Position) -> bool:
    """A module fed a single position right after a larger map (ConvNeXt's ``norm3`` after ``x.mean((2, 3))``): the
    pooling happened in the forward code, so the head side has begun."""
    return pos.size in SINGLE_POSITION and positions_in == 1 and math.prod(prev.size) > 1


def dedupe(positions: List[Position], calls: Sequence[Call]) -> List[Position]:
    """One position per handed-on tensor: a container over its own last child's output, or the first sibling."""
    out: List[Position] = []
    for pos in positions:
        if out and pos.tensor_id == out[-1].tensor_id:
            prev, here = calls[out[-1].call], calls[pos.call]
            if here.start < prev.start and here.end > prev.end:
                out[-1] = pos  # the enclosing call hands on its child's very output: name the container
            continue
        out.append(pos)
    return out


def main_path(
    probe: Probe, is_cut: Callable[[str], bool], channels: Mapping[str, int], prefer_nhwc: bool
) -> List[Position]:
    """The cuts of the forward pass below the root, input side first, finest where the resolution changes."""
    if probe.root is None:
        raise ValueError("the tapped module did not run in the probe forward pass.")

    def walk(idx: int) -> Tuple[List[Position], bool]:
        out: List[Position] = []
        for child in probe.calls[idx].children:
            pos = position_of(probe, child, channels, prefer_nhwc)
            if pos is None:
                continue
            entry = _input_key(probe.calls[child], probe, None, prefer_nhwc)
            if out and _after_functional_pool(pos, entry, out[-1]):
                return out, True
            if _pools_to_a_point(probe.calls[child], pos, entry):
                if probe.calls[child].children:  # a container that ends in global pooling: its inside counts
                    out.extend(walk(child)[0])
                return out, True
            if not is_cut(pos.name):
                continue
            kids = [position_of(probe, g, channels, prefer_nhwc) for g in probe.calls[child].children]
            if len({k.key[-1] for k in kids if k is not None} - {entry}) >= MIN_RESOLUTIONS_TO_DESCEND:
                # the container spans several resolutions (VGG's `features`, timm's `blocks`/`layers`): its own
                # children are the stages. A single transition (a downsampling module) is not descended into.
                inner, stopped = walk(child)
                out.extend(inner)
                if stopped:
                    return out, True
            out.append(pos)
        return out, False

    return dedupe(walk(probe.root)[0], probe.calls)


def named_positions(
    probe: Probe, names: Sequence[str], channels: Mapping[str, int], prefer_nhwc: bool
) -> List[Position]:
    """Positions of the named modules that ran once with a feature output, in call order."""
    by_name: Dict[str, int] = {}
    for i, call in enumerate(probe.calls):
        by_name.setdefault(call.name, i)
    found = []
    for name in names:
        if name in by_name:
            pos = position_of(probe, by_name[name], channels, prefer_nhwc)
            if pos is not None:
                found.append(pos)
    found.sort(key=lambda p: probe.calls[p.call].end)
    return dedupe(found, probe.calls)
