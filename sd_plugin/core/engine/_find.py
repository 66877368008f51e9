"""The placement pipeline's driver: :func:`find_exit_layout` and its result, :class:`ExitLayout`.

trace (:mod:`._probe`) -> candidates (:mod:`._candidates`) -> cut tests (:mod:`._cuts`) -> choice (:mod:`._choice`),
run in one probe mode: on the meta device (shapes only) where the model allows it, else (or where a real forward is
faster than the meta trace) on real tensors in eval mode without gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn

from ..config import SelfDistillConfig
from ._candidates import Position, main_path, named_positions
from ._choice import BLOCK, STAGE, place, stages_or_blocks, to_point
from ._cuts import PROBE_BATCH, CutOracle
from ._points import ExitPoint
from ._probe import Probe, ProbeError, probe_mode, trace

__all__ = ["ExitLayout", "find_exit_layout", "REAL_TRIAL_PARAMS"]

#: Models up to this many parameters are timed once on real tensors: when that forward is faster than the meta
#: trace (small models: meta tensors cost Python-level shape functions per op, more than a small model's
#: arithmetic), the probe and its cut tests run for real. Larger models skip the trial, which is itself one real
#: forward: the meta trace costs per op, whatever the weights, while a real forward grows with the arithmetic, so
#: for large models the trial would mostly add one slow forward. The bound keeps ViT-Base (86M) and smaller in it.
REAL_TRIAL_PARAMS = 100_000_000

#: Seed of the real probe's input (the value test compares outputs, so the input is fixed).
_PROBE_SEED = 0


@dataclass(frozen=True)
class ExitLayout:
    """Where exits go.

    Attributes:
        kind: ``'stage'`` (exits after stages: where the resolution changes) or ``'block'`` (isotropic models:
            exits after blocks).
        positions: Every stage end (or block), shallowest first; ``exit_indices`` index this list and the last one
            feeds the deepest classifier.
        points: The exit points chosen, shallowest first.
        deepest: The last position, as a point.
        teacher: The input of the model's own classifier (when the adapter asked for it).
        probed_on: ``'meta'`` (shapes only) or the device type the probe ran on.
        output_shape: Shape of the model's output in the probe (batch first), when it is one tensor.
    """

    kind: str
    positions: Tuple[str, ...]
    points: Tuple[ExitPoint, ...]
    deepest: ExitPoint
    teacher: Optional[ExitPoint]
    probed_on: str
    output_shape: Optional[Tuple[int, ...]] = None

    @property
    def num_positions(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class _Request:
    """What the adapter asked for, the same in every probe mode."""

    candidates: Optional[Sequence[str]]
    user_given: bool
    channels: Dict[str, int]
    prefer_nhwc: bool
    config: SelfDistillConfig
    name: str
    fix: str


def _dtype_device(owner: nn.Module) -> Tuple[torch.dtype, torch.device]:
    for p in owner.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _teacher_point(probe: Probe, name: str) -> ExitPoint:
    calls = [c for c in probe.calls if c.name == name]
    if len(calls) != 1 or calls[0].input_shape is None:
        raise ValueError(f"the classifier {name!r} did not run exactly once on one batch of features in the probe.")
    call, shape = calls[0], calls[0].input_shape
    if len(shape) == 2:
        return ExitPoint(name, "NC", int(shape[1]), hook="forward_pre")
    if len(shape) == 3:
        return ExitPoint(name, "NLC", int(shape[2]), hook="forward_pre")
    if len(shape) == 4:
        fmt = "NHWC" if call.cls == "Linear" else "NCHW"
        return ExitPoint(name, fmt, int(shape[3] if fmt == "NHWC" else shape[1]), hook="forward_pre")
    raise ValueError(f"the classifier {name!r} takes a {len(shape)}-D input; the feature hint needs 2-D to 4-D.")


class _NeedRealProbe(Exception):
    """The meta probe met a container it cannot judge by shapes alone."""


def _choose(
    req: _Request, probe: Probe, cuts: CutOracle, input_hw: Tuple[int, int]
) -> Tuple[str, List[Position], Tuple[int, ...]]:
    """Candidates, then stages or blocks, then the configured exit indices: ``(kind, positions, chosen)``."""
    ch, nhwc = req.channels, req.prefer_nhwc
    if req.user_given:
        named = list(cast(Sequence[str], req.candidates))  # user_given comes with the names
        positions = named_positions(probe, named, ch, nhwc)
        missing = sorted(set(named) - {p.name for p in positions})
        if missing:
            raise ValueError(
                f"stage_modules {missing} did not run exactly once with a feature-map or token output in a "
                f"forward pass of {req.name}; name modules on the main path."
            )
        positions.sort(key=lambda p: named.index(p.name))
        return STAGE, positions, place(STAGE, positions, req.config, None, name=req.name, fix=req.fix)
    attempts: List[Callable[[], List[Position]]] = []
    if req.candidates is not None:
        candidates = req.candidates
        attempts.append(lambda: named_positions(probe, candidates, ch, nhwc))
    attempts.append(lambda: main_path(probe, cuts, ch, nhwc))
    last_error: Optional[ValueError] = None
    for find in attempts:
        positions = find()
        try:
            kind, ends = stages_or_blocks(probe, positions, input_hw, cuts, ch, nhwc, name=req.name, fix=req.fix)
            return kind, ends, place(kind, ends, req.config, cuts, name=req.name, fix=req.fix)
        except ValueError as e:
            last_error = e
    assert last_error is not None
    raise last_error


def _probe_input(shape: Sequence[int], dtype: torch.dtype, device: torch.device, meta: bool) -> torch.Tensor:
    if meta:
        return torch.empty(PROBE_BATCH, *shape, device="meta", dtype=dtype)
    g = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randn(PROBE_BATCH, *shape, generator=g).to(device=device, dtype=dtype)


def _real_forward_seconds(
    owner: nn.Module, run: Callable[[torch.Tensor], Any], shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> float:
    """Seconds of one real probe forward (inf when the model is large or the forward fails)."""
    if sum(p.numel() for p in owner.parameters()) > REAL_TRIAL_PARAMS:
        return math.inf
    x = _probe_input(shape, dtype, device, meta=False)
    try:
        with probe_mode(owner, False):
            start = time.perf_counter()
            run(x)
            return time.perf_counter() - start
    except Exception:  # noqa: BLE001 - the probe proper reports the failure
        return math.inf


def find_exit_layout(
    root: nn.Module,
    run: Callable[[torch.Tensor], Any],
    input_shape: Sequence[int],
    config: SelfDistillConfig,
    *,
    owner: Optional[nn.Module] = None,
    candidates: Optional[Sequence[str]] = None,
    user_given: bool = False,
    channels: Optional[Mapping[str, int]] = None,
    prefer_nhwc: bool = False,
    teacher: Optional[str] = None,
    name: Optional[str] = None,
    fix: str = "",
    probe: str = "auto",
) -> ExitLayout:
    """Probe ``run`` (the model's forward on a (N, C, H, W) batch) and place exits on ``root``'s main path.

    Args:
        root: The module whose submodules exits tap (timm: the model; MMPretrain: the backbone).
        run: Calls the model on an input batch and returns its output (logits).
        input_shape: (C, H, W) of the probe input.
        config: Options (``exit_indices``).
        owner: The module holding every weight ``run`` uses (default ``root``); swapped to meta tensors for a
            shapes-only probe when its forward allows it.
        candidates: Module names to take positions from first (timm's ``feature_info``); the general main-path
            search is the fallback. With ``user_given`` they are the stages, as given.
        channels: Expected channels per module name (tells NCHW from NHWC).
        prefer_nhwc: Ambiguous 4-D maps are NHWC.
        teacher: Name of the module whose input is the deepest classifier's features.
        name: The model's name for messages; ``fix``: the way out, appended to messages.
        probe: ``'auto'``: shapes only on the meta device, unless the model allows no meta forward, is on the meta
            device already, or is small enough that a real forward is faster (then real tensors); ``'meta'`` or
            ``'real'`` force one (``'real'`` needs real weights).
    """
    if probe not in ("auto", "meta", "real"):
        raise ValueError(f"probe must be 'auto', 'meta' or 'real', got {probe!r}.")
    if len(input_shape) != 3 or not all(isinstance(s, int) and s > 0 for s in input_shape):
        raise ValueError(f"input_size must be (C, H, W) positive ints, got {tuple(input_shape)!r}.")
    owner = owner if owner is not None else root
    req = _Request(
        candidates=candidates,
        user_given=user_given,
        channels=dict(channels or {}),
        prefer_nhwc=prefer_nhwc,
        config=config,
        name=name or type(root).__name__,
        fix=fix,
    )
    dtype, device = _dtype_device(owner)
    modes = [True] if device.type == "meta" else [True, False]
    if probe != "auto":
        if probe == "real" and device.type == "meta":
            raise ValueError("probe='real' needs real weights; this model is on the meta device.")
        modes = [probe == "meta"]
    real_possible = len(modes) > 1
    real_seconds = _real_forward_seconds(owner, run, input_shape, dtype, device) if real_possible else math.inf
    hw = (int(input_shape[-2]), int(input_shape[-1]))
    for meta in modes:
        try:
            with probe_mode(owner, meta):
                x = _probe_input(input_shape, dtype, device, meta)
                start = time.perf_counter()
                traced = trace(root, run, x)
                trace_seconds = time.perf_counter() - start
                if traced.output_batch != x.shape[0]:
                    raise RuntimeError(f"the probe returned batch {traced.output_batch}, expected {x.shape[0]}.")
                if meta and trace_seconds > real_seconds:
                    raise _NeedRealProbe("a real forward is faster")
                cuts = CutOracle(root, run, x, traced, meta)
                kind, positions, chosen = _choose(req, traced, cuts, hw)
                if meta and real_possible and kind == BLOCK and cuts.unjudged:
                    # Stage containers that need the full batch (Twins-SVT) look like no stages on meta.
                    raise _NeedRealProbe(cuts.unjudged[0])
                teacher_point = _teacher_point(traced, teacher) if teacher is not None else None
        except Exception as e:
            if meta and len(modes) > 1:
                continue  # this forward needs real tensors: probe for real
            if isinstance(e, ProbeError):
                raise ProbeError(
                    f"the probe forward pass of {req.name} at input size {tuple(input_shape)} failed ({e}). {fix}"
                ) from e
            raise
        deepest = positions[-1]
        return ExitLayout(
            kind=kind,
            positions=tuple(p.name for p in positions),
            points=tuple(
                to_point(traced, positions[i], deepest, cuts.shrinkable.get(positions[i].name, True)) for i in chosen
            ),
            deepest=to_point(traced, deepest, deepest),
            teacher=teacher_point,
            probed_on="meta" if meta else device.type,
            output_shape=traced.output_shape,
        )
    raise AssertionError("unreachable")  # pragma: no cover
