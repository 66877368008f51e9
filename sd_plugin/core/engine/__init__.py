"""The exit engine: where exits go on any backbone, and the taps that read them.

One place owns exit points for both adapters:

- **probe** (:mod:`._probe`): one traced forward pass (on the meta device where the
  model allows it, else for real in eval mode without gradients) records every
  module call, the call tree and each call's batch-first outputs;
- **layout** (:mod:`._layout`): feature layout (NCHW, NHWC, NLC tokens, channels-last
  token groups), channels and resolution of each output; the *main path* — the
  calls that are cuts of the forward pass, tested by handing on a smaller batch —
  found from the call tree, not from a list of container names; grouping into
  stages (where the resolution changes) or, for isotropic models, blocks; strides;
- **taps** (:mod:`._taps`): :class:`ExitEngine`, persistent per-thread hooks that
  capture features, stop the forward after exit *k*, or let early exit hand on
  fewer samples.

Adapters only say which modules are candidates (timm: ``feature_info``; MMPretrain: the
whole backbone, or the user's ``stage_modules``) and how to run the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..config import SelfDistillConfig, default_block_exits, default_stage_exits
from ._layout import Position, block_run, group, leaf_share_after, main_path, named_positions, to_point
from ._points import FEATURE_FORMATS, ExitPoint, StopForward, get_submodule, select_feature
from ._probe import PROBE_BATCH, Probe, ProbeError, is_cut, is_value_cut, probe_mode, trace
from ._taps import Capture, ExitEngine, InterceptFn

__all__ = [
    "ExitEngine",
    "ExitLayout",
    "ExitPoint",
    "Capture",
    "InterceptFn",
    "StopForward",
    "FEATURE_FORMATS",
    "ProbeError",
    "find_exit_layout",
    "get_submodule",
    "select_feature",
]

STAGE, BLOCK = "stage", "block"

#: Models up to this many parameters are timed once on real tensors: when that forward is faster than the meta
#: trace (small models: meta tensors cost Python-level shape functions per op), the cut tests run for real.
REAL_TRIAL_PARAMS = 100_000_000


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


class _Chooser:
    """Runs inside one probe mode: the trace, cached cut tests and the placement."""

    def __init__(
        self, root: nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor, opts: Dict[str, Any], meta: bool
    ) -> None:
        self.root, self.run, self.x, self.opts, self.meta = root, run, x, opts, meta
        start = time.perf_counter()
        self.probe = trace(root, run, x)
        self.trace_seconds = time.perf_counter() - start
        if self.probe.output_batch != x.shape[0]:
            raise RuntimeError(f"the probe returned batch {self.probe.output_batch}, expected {x.shape[0]}.")
        self._cuts: Dict[str, bool] = {}
        self.shrinkable: Dict[str, bool] = {}
        self.unjudged: List[str] = []

    def is_cut(self, name: str) -> bool:
        """On the main path: handing on fewer samples there works, or (real probe) nothing else carries the input."""
        if name not in self._cuts:
            shrink = is_cut(self.root, name, self.run, self.x)
            self.shrinkable[name] = shrink
            if not shrink and self.meta and any(c.name == name and c.children for c in self.probe.calls):
                self.unjudged.append(name)  # a container only a real probe (the value test) can judge
            self._cuts[name] = shrink or (not self.meta and is_value_cut(self.root, name, self.run, self.x))
        return self._cuts[name]

    def choose(self) -> Tuple[str, List[Position], Tuple[int, ...]]:
        o = self.opts
        ch, nhwc = o["channels"], o["prefer_nhwc"]
        hw = (int(self.x.shape[-2]), int(self.x.shape[-1]))
        if o["user_given"]:
            positions = named_positions(self.probe, o["candidates"], ch, nhwc)
            missing = sorted(set(o["candidates"]) - {p.name for p in positions})
            if missing:
                raise ValueError(
                    f"stage_modules {missing} did not run exactly once with a feature-map or token output in a "
                    f"forward pass of {o['name']}; name modules on the main path."
                )
            positions.sort(key=lambda p: list(o["candidates"]).index(p.name))
            return self._place(STAGE, positions)
        attempts: List[Callable[[], List[Position]]] = []
        if o["candidates"] is not None:
            attempts.append(lambda: named_positions(self.probe, o["candidates"], ch, nhwc))
        attempts.append(lambda: main_path(self.probe, self.is_cut, ch, nhwc))
        last_error: Optional[ValueError] = None
        for find in attempts:
            positions = find()
            try:
                kind, ends = self._stages_or_blocks(positions, hw)
                return self._place(kind, ends)
            except ValueError as e:
                last_error = e
        assert last_error is not None
        raise last_error

    def _stages_or_blocks(self, positions: List[Position], hw: Tuple[int, int]) -> Tuple[str, List[Position]]:
        ends = group(positions, hw, self.probe)
        blocks = block_run(self.probe, self.is_cut, self.opts["channels"], self.opts["prefer_nhwc"])
        if blocks and len(ends) >= 2:
            # A stem with resolution changes of its own (T2T-ViT's tokens-to-token) before a long body of repeated
            # blocks: the blocks are the depth, so exits go after blocks, not inside the stem.
            body_start = self.probe.calls[ends[-2].call].end
            if self.probe.calls[blocks[0].call].start > body_start and leaf_share_after(self.probe, body_start) >= 0.75:
                return BLOCK, blocks
        if len(ends) >= 3:
            return STAGE, ends
        if blocks:
            return BLOCK, blocks
        if len(ends) >= 2:
            return STAGE, ends
        raise ValueError(
            f"cannot find where to put exits in {self.opts['name']}: its forward pass shows "
            f"{len(ends)} stage(s) and no run of repeated blocks on the main path. {self.opts['fix']}"
        )

    def _place(self, kind: str, positions: List[Position]) -> Tuple[str, List[Position], Tuple[int, ...]]:
        n = len(positions)
        default = default_block_exits(n) if kind == BLOCK else default_stage_exits(n)
        chosen = self.opts["config"].resolve_exit_indices(n, default)
        if not chosen and self.opts["config"].exit_indices != ():  # exit_indices=[]: no exits, a method alone
            raise ValueError(f"{self.opts['name']} has too few positions ({n}) for an exit. {self.opts['fix']}")
        if not self.opts["user_given"]:
            for i in chosen:
                if not self.is_cut(positions[i].name):
                    raise ValueError(
                        f"{self.opts['name']}: module {positions[i].name!r} is not on the main forward path (the rest "
                        f"of the model does not depend on it alone), so no exit can read it. {self.opts['fix']}"
                    )
        return kind, positions, chosen


def _real_forward_seconds(
    owner: nn.Module, run: Callable[[torch.Tensor], Any], shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> float:
    """Seconds of one real probe forward (inf when the model is large or the forward fails)."""
    if sum(p.numel() for p in owner.parameters()) > REAL_TRIAL_PARAMS:
        return math.inf
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_BATCH, *shape, generator=g).to(device=device, dtype=dtype)
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
    opts = dict(
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
    opts["real_possible"] = len(modes) > 1
    real_seconds = _real_forward_seconds(owner, run, input_shape, dtype, device) if len(modes) > 1 else math.inf
    for meta in modes:
        try:
            with probe_mode(owner, meta):
                if meta:
                    x = torch.empty(PROBE_BATCH, *input_shape, device="meta", dtype=dtype)
                else:
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(PROBE_BATCH, *input_shape, generator=g).to(device=device, dtype=dtype)
                chooser = _Chooser(root, run, x, opts, meta)
                if meta and chooser.trace_seconds > real_seconds:
                    raise _NeedRealProbe("a real forward is faster")
                kind, positions, chosen = chooser.choose()
                if meta and opts["real_possible"] and kind == BLOCK and chooser.unjudged:
                    # Stage containers that need the full batch (Twins-SVT) look like no stages on meta.
                    raise _NeedRealProbe(chooser.unjudged[0])
                teacher_point = _teacher_point(chooser.probe, teacher) if teacher is not None else None
        except Exception as e:
            if meta and len(modes) > 1:
                continue  # this forward needs real tensors: probe for real
            if isinstance(e, ProbeError):
                raise ProbeError(
                    f"the probe forward pass of {opts['name']} at input size {tuple(input_shape)} failed ({e}). {fix}"
                ) from e
            raise
        deepest = positions[-1]
        return ExitLayout(
            kind=kind,
            positions=tuple(p.name for p in positions),
            points=tuple(
                to_point(chooser.probe, positions[i], deepest, chooser.shrinkable.get(positions[i].name, True))
                for i in chosen
            ),
            deepest=to_point(chooser.probe, deepest, deepest),
            teacher=teacher_point,
            probed_on="meta" if meta else device.type,
            output_shape=chooser.probe.output_shape,
        )
    raise AssertionError("unreachable")  # pragma: no cover
