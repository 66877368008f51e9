"""Pipeline step 4, the choice: stages or blocks, and the exit points at the configured indices.

From the main-path candidates (:mod:`._candidates`) and the cut tests (:mod:`._cuts`):

- :func:`group`: stage ends, the last position of each run of one resolution, stem runs dropped;
- :func:`block_run`: for isotropic models (ViT, XCiT, ConvMixer ...), the longest run of repeated blocks;
- :func:`stages_or_blocks`: which of the two the exits follow;
- :func:`place`: the configured ``exit_indices`` into those positions, each checked to be a cut;
- :func:`to_point`: a chosen position as an :class:`~._points.ExitPoint`, with its stride to the deepest map.
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from ..config import SelfDistillConfig, default_block_exits, default_stage_exits
from ._candidates import Position, position_of
from ._points import ExitPoint
from ._probe import Call, Probe

__all__ = [
    "STAGE",
    "BLOCK",
    "group",
    "block_run",
    "leaf_share_after",
    "stages_or_blocks",
    "place",
    "stride_between",
    "to_point",
]

STAGE, BLOCK = "stage", "block"

# The thresholds below were checked on one model per timm module and per MMPretrain family of the coverage runs
# (docs/results/coverage_*.md); each comment names the models whose placement changes without the rule.

#: A run of one resolution whose features are at most this much smaller than the input (per side) is stem level: a
#: stride-2 stem (2x), or a valid-padding one that rounds down (Inception-v3's 299 -> 147 is 2.03x); the first stage
#: proper is 4x. Without the rule DenseNet, DLA, DPN, RegNetX, ReXNet, VGG-16, EfficientNet-B0 and MobileNetV2 get an
#: exit on their stem; at 2.0 Inception-v3/v4, Inception-ResNet-v2 and Xception still do; at 4.5 the 4x first stage of
#: most hierarchical nets (ResNet's ``layer1``, ConvNeXt's ``stages.0``) loses its exit.
STEM_MAX_REDUCTION = 2.5

#: Stem runs are dropped only when at least this many deeper stage ends remain. At 2, a CIFAR ResNet-18 at 32 px
#: (``layer1`` and ``layer2`` at 1x and 2x: stride-1 stem) keeps only ``layer3`` / ``layer4`` and EfficientViM-M1
#: loses its ``patch_embed`` exit; at 4, ShuffleNet v1/v2 keep an exit on ``maxpool``, TinyViT on ``patch_embed``.
MIN_STAGES_AFTER_STEM = 3

#: Repeated blocks: at least this many same-type siblings in a row with one output shape. At 2, a pair of layers is
#: taken for the model's blocks (NASNet-A and PNASNet-5 Large: ``conv0.bn``'s dropout and activation; XCiT's two
#: class-attention layers on the meta probe). At 4 no model of the coverage runs changes; 3 keeps the shortest body
#: that still has exits at two depths.
MIN_BLOCK_RUN = 3

#: A stem with resolution changes of its own before a run of repeated blocks: the blocks are the model's depth when
#: at least this share of its leaf-module calls finish after the stem's last stage end. T2T-ViT-14 (0.86), HiViT-T
#: (0.83) and NesT-S (0.82) are placed by blocks that way; hierarchical nets whose last stage holds their longest run
#: of blocks stay below it (TinyViT-5M 0.63, GhostNet / RepGhostNet 0.62, LowFormer-B0 0.57, RegNetX 0.53) and are
#: placed by stages.
BODY_LEAF_SHARE = 0.75

#: With at least this many stage ends, the exits follow the stages even when a run of repeated blocks exists (the
#: blocks of one stage). At 4, three-stage nets would be placed by one stage's blocks (ShuffleNet v1/v2, TinyViT,
#: LeViT, PiT, Visformer, EfficientViT-M, SHViT, HRNet-W18-small, Xception); at 2, ConViT and XCiT (blocks after the
#: main ones hand on one token more: a second "stage") and VOLO (outlooker and transformer stages) would be placed
#: by those two stage ends instead of their blocks.
MIN_STAGES_OVER_BLOCKS = 3

#: Fewest stage ends a model is placed by stages with: two ends are one exit and the deepest classifier's stage
#: (NASNet-A and PNASNet-5 Large, which have two and no run of blocks).
MIN_STAGES = 2


def _runs_of_one_resolution(positions: List[Position]) -> List[List[Position]]:
    runs: List[List[Position]] = []
    for pos in positions:
        if runs and runs[-1][-1].key == pos.key:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    return runs


def _is_stem(first: List[Position], ends: List[Position], probe: Probe) -> bool:
    """Whether the first run (ending at ``ends[0]``) is a stem: one module that is no sibling of any deeper stage end
    (TinyViT's ``patch_embed`` before ``stages.0..3``; CoaT-Lite's ``serial_blocks1``), or single layers before stage
    modules (Conformer's ``maxpool``; a LeNet made of single layers keeps them)."""
    parents = {e.name.rpartition(".")[0] for e in ends[1:]}
    lone_stem = len(first) == 1 and first[0].name.rpartition(".")[0] not in parents
    layers_only = all(probe.calls[p.call].is_leaf for p in first)
    return lone_stem or (layers_only and not all(probe.calls[e.call].is_leaf for e in ends[1:]))


def group(positions: List[Position], input_hw: Tuple[int, int], probe: Optional[Probe] = None) -> List[Position]:
    """Stage ends: the last position of every run of one resolution, without stem-level runs.

    Runs at most :data:`STEM_MAX_REDUCTION` smaller than the input are dropped, and (with the ``probe``) a first run
    that is only a stem, each when at least :data:`MIN_STAGES_AFTER_STEM` deeper stage ends remain.
    """
    runs = _runs_of_one_resolution(positions)
    ends = [run[-1] for run in runs]
    deep = [e for e in ends if e.reduction(input_hw) > STEM_MAX_REDUCTION]
    if len(deep) >= MIN_STAGES_AFTER_STEM:
        ends = deep
    if probe is not None and len(ends) > MIN_STAGES_AFTER_STEM:
        first = next(run for run in runs if run[-1] is ends[0])
        if _is_stem(first, ends, probe):
            ends = ends[1:]
    return ends


def _signature(probe: Probe, call: Call) -> Tuple[str, ...]:
    """A call's type and its children's types: repeated blocks share it (a stem of the same class does not)."""
    return (call.cls, *(probe.calls[c].cls for c in call.children))


def block_run(
    probe: Probe, is_cut: Callable[[str], bool], channels: Mapping[str, int], prefer_nhwc: bool
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
            if len(run) >= MIN_BLOCK_RUN:
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


def stages_or_blocks(
    probe: Probe,
    positions: List[Position],
    input_hw: Tuple[int, int],
    is_cut: Callable[[str], bool],
    channels: Mapping[str, int],
    prefer_nhwc: bool,
    *,
    name: str,
    fix: str,
) -> Tuple[str, List[Position]]:
    """``(STAGE, stage ends)`` or ``(BLOCK, repeated blocks)``: where the exits of ``name`` go."""
    ends = group(positions, input_hw, probe)
    blocks = block_run(probe, is_cut, channels, prefer_nhwc)
    if blocks and len(ends) >= MIN_STAGES:
        # A stem with resolution changes of its own (T2T-ViT's tokens-to-token) before a long body of repeated
        # blocks: the blocks are the depth, so exits go after blocks, not inside the stem.
        body_start = probe.calls[ends[-2].call].end
        if probe.calls[blocks[0].call].start > body_start and leaf_share_after(probe, body_start) >= BODY_LEAF_SHARE:
            return BLOCK, blocks
    if len(ends) >= MIN_STAGES_OVER_BLOCKS:
        return STAGE, ends
    if blocks:
        return BLOCK, blocks
    if len(ends) >= MIN_STAGES:
        return STAGE, ends
    raise ValueError(
        f"cannot find where to put exits in {name}: its forward pass shows "
        f"{len(ends)} stage(s) and no run of repeated blocks on the main path. {fix}"
    )


def place(
    kind: str,
    positions: Sequence[Position],
    config: SelfDistillConfig,
    is_cut: Optional[Callable[[str], bool]],
    *,
    name: str,
    fix: str,
) -> Tuple[int, ...]:
    """The indices into ``positions`` that get exits: ``config.exit_indices`` or the default for ``kind``.

    With ``is_cut`` (positions the engine found, not the user's ``stage_modules``), each chosen position must be a
    cut of the forward pass.
    """
    n = len(positions)
    default = default_block_exits(n) if kind == BLOCK else default_stage_exits(n)
    chosen = config.resolve_exit_indices(n, default)
    if not chosen and config.exit_indices != ():  # exit_indices=[]: no exits, a method alone
        raise ValueError(f"{name} has too few positions ({n}) for an exit. {fix}")
    if is_cut is not None:
        for i in chosen:
            if not is_cut(positions[i].name):
                raise ValueError(
                    f"{name}: module {positions[i].name!r} is not on the main forward path (the rest "
                    f"of the model does not depend on it alone), so no exit can read it. {fix}"
                )
    return chosen


def stride_between(here: Position, deepest: Position) -> int:
    """Downsampling from ``here`` to the deepest feature (1 for tokens, which are pooled)."""
    if here.fmt not in ("NCHW", "NHWC"):
        return 1
    return max(1, round(here.side() / max(1e-6, deepest.side())))


def to_point(probe: Probe, pos: Position, deepest: Position, shrinkable: bool = True) -> ExitPoint:
    """The exit point reading ``pos``'s feature (a copy where later code writes into it in place)."""
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
