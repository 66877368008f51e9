"""From a traced probe pass to exit points: layouts, main-path positions, stages or blocks, strides."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ._points import ExitPoint
from ._probe import Call, Probe

__all__ = ["Position", "tensor_layout", "position_of", "main_path", "named_positions", "group", "block_run"]


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
    return abs(rh - rw) <= 0.05 * max(rh, rw)


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
    if pos.size not in ((1, 1), (1,)):
        return False
    return positions_in > 1 and ("pool" in call.cls.lower() or positions_in > 4)


def _input_key(call: Call, probe: Probe, channels_hint: Optional[int], prefer_nhwc: bool) -> int:
    """Positions (H*W or L) of a call's input, -1 when unknown."""
    if call.input_shape is None or len(call.input_shape) < 3:
        return -1
    input_hw = probe.input_shape[-2], probe.input_shape[-1]
    return _positions_in(torch.empty(call.input_shape, device="meta"), input_hw, channels_hint, prefer_nhwc)


def _after_functional_pool(pos: Position, positions_in: int, prev: Position) -> bool:
    """A module fed a single position right after a larger map (ConvNeXt's ``norm3`` after ``x.mean((2, 3))``): the
    pooling happened in the forward code, so the head side has begun."""
    return pos.size in ((1, 1), (1,)) and positions_in == 1 and math.prod(prev.size) > 1


def _dedupe(positions: List[Position], calls: Sequence[Call]) -> List[Position]:
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
            if len({k.key[-1] for k in kids if k is not None} - {entry}) >= 2:
                # the container spans several resolutions (VGG's `features`, timm's `blocks`/`layers`): its own
                # children are the stages. A single transition (a downsampling module) is not descended into.
                inner, stopped = walk(child)
                out.extend(inner)
                if stopped:
                    return out, True
            out.append(pos)
        return out, False

    return _dedupe(walk(probe.root)[0], probe.calls)


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
    return _dedupe(found, probe.calls)


def group(positions: List[Position], input_hw: Tuple[int, int], probe: Optional[Probe] = None) -> List[Position]:
    """Stage ends: the last position of every run of one resolution, without stem-level runs.

    With the ``probe``, a first run that is only a stem carries no exit either when at least three deeper stages
    remain: single layers before stage modules (Conformer's ``maxpool``; a LeNet made of single layers keeps them),
    or one module that is no sibling of any deeper stage end (TinyViT's ``patch_embed`` before ``stages.0..3``).
    """
    runs: List[List[Position]] = []
    for pos in positions:
        if runs and runs[-1][-1].key == pos.key:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    ends = [run[-1] for run in runs]
    # Stem-level runs (at most ~2x downsampling, e.g. a stride-2 stem or a valid-padding 299 -> 147 one) carry no
    # exit when at least three deeper stages remain.
    deep = [e for e in ends if e.reduction(input_hw) > 2.5]
    if len(deep) >= 3:
        ends = deep
    if probe is not None and len(ends) >= 4:
        first = next(run for run in runs if run[-1] is ends[0])
        parents = {e.name.rpartition(".")[0] for e in ends[1:]}
        lone_stem = len(first) == 1 and first[0].name.rpartition(".")[0] not in parents
        layers_only = all(probe.calls[p.call].is_leaf for p in first)
        if lone_stem or (layers_only and not all(probe.calls[e.call].is_leaf for e in ends[1:])):
            ends = ends[1:]
    return ends


def _signature(probe: Probe, call: Call) -> Tuple[str, ...]:
    """A call's type and its children's types: repeated blocks share it (a stem of the same class does not)."""
    return (call.cls, *(probe.calls[c].cls for c in call.children))


def block_run(
    probe: Probe, is_cut: Callable[[str], bool], channels: Mapping[str, int], prefer_nhwc: bool, min_len: int = 3
) -> List[Position]:
    """The longest run of same-type sibling calls on the main path with equal output shapes (repeated blocks)."""
    runs: List[List[Position]] = []
    for call in probe.calls:
        run: List[Position] = []
        for child in call.children:
            pos = position_of(probe, child, channels, prefer_nhwc)
            if pos is None:
                run = []
                continue
            last = run[-1] if run else None
            same = (
                last is not None
                and _signature(probe, probe.calls[last.call]) == _signature(probe, probe.calls[child])
                and (last.key, last.channels) == (pos.key, pos.channels)
            )
            run = [*run, pos] if same else [pos]
            if len(run) >= min_len:
                if runs and runs[-1][0] is run[0]:
                    runs[-1] = run
                else:
                    runs.append(run)
    runs.sort(key=lambda r: (len(r), probe.calls[r[-1].call].end), reverse=True)
    for run in runs:
        if is_cut(run[0].name) and is_cut(run[-1].name):
            return run
    return []


def leaf_share_after(probe: Probe, end: int) -> float:
    """Share of the pass's leaf-module calls that finish after clock ``end`` (a rough measure of depth/work)."""
    leaves = [c for c in probe.calls if c.is_leaf and c.end >= 0]
    return sum(1 for c in leaves if c.end > end) / max(1, len(leaves))


def stride_between(here: Position, deepest: Position) -> int:
    """Downsampling from ``here`` to the deepest feature (1 for tokens, which are pooled)."""
    if here.fmt not in ("NCHW", "NHWC"):
        return 1
    return max(1, round(here.side() / max(1e-6, deepest.side())))


def to_point(probe: Probe, pos: Position, deepest: Position, shrinkable: bool = True) -> ExitPoint:
    copy = probe.calls[pos.call].written_later
    return ExitPoint(
        pos.name,
        pos.fmt,
        pos.channels,
        stride_between(pos, deepest),
        pos.output_index,
        shrinkable=shrinkable,
        copy=copy,
    )
