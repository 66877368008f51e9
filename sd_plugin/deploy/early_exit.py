"""Early-exit inference: each sample leaves at the first exit confident enough, later stages are skipped.

The model's own forward pass runs once; at every exit point an intercept
function (the model's exit engine, :meth:`ExitEngine.intercept`) computes that
exit for the samples still unanswered, records those it answers and hands only
the others on to the rest of the network (a smaller batch). When no sample is
left, :class:`~sd_plugin.core.StopForward` ends the pass. An exit whose
threshold is ``None`` is not computed at all.

Every call keeps its book-keeping in local variables and the engine's taps are
installed once with per-thread sessions, so one :class:`EarlyExitModel` serves
many threads at once and no hook is added or removed per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn as nn

from ..core import MultiExitModel, StopForward
from .policy import ExitPolicy, confidence_scores, criterion_sign

__all__ = [
    "EarlyExitModel",
    "EarlyExitOutput",
    "as_multi_exit",
    "single_label",
    "early_exit_forward",
    "forward_with_features",
    "intercepting",
    "run_segment",
]


def single_label(model: MultiExitModel, what: str) -> MultiExitModel:
    """``model`` unless it is multi-label (``multi_label`` True: a sigmoid per class), for which ``what`` (built on
    one softmax over the classes: its confidence and top-1 accuracy) is not defined: then a ValueError."""
    if getattr(model, "multi_label", False):
        raise ValueError(
            f"{what} is not available for a multi-label model (a sigmoid per class): its confidence rules and "
            "accuracy assume one softmax over the classes. Truncation (sd_plugin.deploy.truncate) and export work."
        )
    return model


def as_multi_exit(model: Any) -> MultiExitModel:
    """``model`` if it implements :class:`~sd_plugin.core.MultiExitModel`, else a TypeError naming the fix."""
    if not isinstance(model, nn.Module) or not isinstance(model, MultiExitModel):
        raise TypeError(
            f"{type(model).__name__} is not a model with exits (sd_plugin.core.MultiExitModel): pass the "
            "model returned by sd_plugin.wrap(...) or an MMPretrain SelfDistillClassifier."
        )
    if model.num_exits != len(model.exit_points):
        raise ValueError(f"{type(model).__name__} reports {model.num_exits} exits but {len(model.exit_points)} points.")
    return model


@dataclass
class EarlyExitOutput:
    """Result of an early-exit forward pass.

    Attributes:
        logits: (N, C) logits, in input order, from the exit that answered each sample.
        exit: (N,) int64, the exit that answered, numbered as the training log names them: 1 is ``exit1``
            (the shallowest), ``num_exits + 1`` the deepest classifier.
        samples_per_stage: Samples that reached each exit point (shallowest first), then the samples for
            which the deepest classifier produced logits. A stage that did not run has 0.
    """

    logits: torch.Tensor
    exit: torch.Tensor
    samples_per_stage: List[int]

    @property
    def stages_run(self) -> int:
        """Number of exit stages (and the deepest classifier) that processed at least one sample."""
        return sum(1 for n in self.samples_per_stage if n > 0)


# ----------------------------------------------------------------------------------------------- interception
def _engine(model: Any) -> Any:
    """The model's exit engine (:class:`~sd_plugin.core.engine.ExitEngine`), its persistent taps installed."""
    engine = getattr(model, "exit_engine", None)
    if engine is None:
        raise TypeError(f"{type(model).__name__} has no exit_engine: it does not implement MultiExitModel.")
    ensure = getattr(engine, "ensure_installed", None)
    if callable(ensure):
        ensure()
    return engine


def intercepting(model: Any, fn: Callable[[int, torch.Tensor, Any], Any]) -> Any:
    """Context manager calling ``fn(k, feature, value)`` at every exit point of ``model``'s forward pass.

    ``fn`` returns None (go on), a replacement value, or raises ``StopForward`` (``ExitEngine.intercept``: the
    engine's taps are persistent and its sessions per thread, so nothing is registered per call).
    """
    return _engine(model).intercept(fn)


def run_segment(
    model: Any,
    inputs: torch.Tensor,
    start: Optional[int] = None,
    stop: Optional[int] = None,
    example: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``model``'s forward from exit point ``start`` to exit point ``stop`` (0-based; :meth:`ExitEngine.run_segment`).

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel`.
        inputs: The images (``start`` None), or point ``start``'s feature, handed on in place of what the model
            computed there from ``example``.
        start: The exit point the segment starts from; None: from the images.
        stop: The exit point whose feature is returned (later modules do not run); None: the deepest logits.
        example: Images of the right shape that the model runs up to ``start`` (needed with ``start``: their
            features there are replaced, so with a graph exporter only ``inputs`` reach the result).
    """
    mx = as_multi_exit(model)
    images, value = inputs, None
    if start is not None:
        if example is None:
            raise ValueError("a segment that starts at an exit point needs example images to run the model up to it.")
        images, value = example, inputs
    return cast(
        torch.Tensor,
        _engine(model).run_segment(lambda: mx.forward_deepest(images), start=start, value=value, stop=stop),
    )


def forward_with_features(model: Any, inputs: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The deepest logits and every exit point's feature from one forward pass (the engine's capture)."""
    mx = as_multi_exit(model)
    with _engine(model).capture() as cap:
        deepest = mx.forward_deepest(inputs)
    return deepest, list(cap.features)[: mx.num_exits]


def all_exit_logits(model: Any, inputs: torch.Tensor) -> torch.Tensor:
    """(E + 1, N, C) logits of every exit (``exit1`` first) and the deepest classifier, from one forward pass."""
    mx = as_multi_exit(model)
    deepest, features = forward_with_features(mx, inputs)
    return torch.stack([*(mx.forward_exit(k, f) for k, f in enumerate(features)), deepest])


def _subset(value: Any, keep: torch.Tensor, batch: int, k: int) -> Any:
    """``value`` (a hooked module's output or input tuple) with only the samples at the indices ``keep``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, keep)
    if isinstance(value, (tuple, list)):
        items = [
            v.index_select(0, keep) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
            for v in value
        ]
        return type(value)(items)
    raise TypeError(f"cannot drop answered samples from the {type(value).__name__} given at exit point {k}.")


# ------------------------------------------------------------------------------------------------ the cascade
class _Run:
    """Book-keeping of one early-exit forward pass (local to the call: calls share no state).

    ``rows`` are the original indices of the samples in the batch the model is processing now; ``open_pos`` the
    positions in it of the samples still unanswered (None: all of them). At a point that cannot hand on fewer
    samples (``ExitPoint.shrinkable`` False) the answered samples stay in the batch, marked answered.
    """

    def __init__(self, mx: MultiExitModel, inputs: torch.Tensor, bounds: Sequence[float], criterion: str) -> None:
        self.mx = mx
        self.points = mx.exit_points
        self.bounds = list(bounds)
        self.criterion = criterion
        self.batch = inputs.shape[0]
        self.rows = torch.arange(self.batch, device=inputs.device)
        self.open_pos: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.exit = torch.full((self.batch,), mx.num_exits + 1, dtype=torch.long, device=inputs.device)
        self.entered = [0] * mx.num_exits

    def open_rows(self) -> torch.Tensor:
        return self.rows if self.open_pos is None else self.rows.index_select(0, self.open_pos)

    def answer(self, rows: torch.Tensor, logits: torch.Tensor, k: int) -> None:
        if self.logits is None:
            if rows.numel() == self.batch:
                self.logits = logits  # everything answered at once, in input order: no copy
                self.exit.fill_(k + 1)
                return
            self.logits = logits.new_zeros(self.batch, logits.shape[1])
        self.logits.index_copy_(0, rows, logits)
        self.exit.index_fill_(0, rows, k + 1)

    def __call__(self, k: int, feature: torch.Tensor, value: Any) -> Any:
        m = self.rows.numel()
        if feature.shape[0] != m:
            raise RuntimeError(
                f"exit {k + 1} got {feature.shape[0]} samples, expected {m}: the feature's first dimension must "
                "be the batch."
            )
        open_rows = self.open_rows()
        n = open_rows.numel()
        self.entered[k] = n
        bound = self.bounds[k]
        if bound == float("inf"):
            return None  # this exit never answers: do not compute it
        logits = self.mx.forward_exit(k, feature if self.open_pos is None else feature.index_select(0, self.open_pos))
        if logits.dim() != 2 or logits.shape[0] != n:
            raise RuntimeError(f"exit {k + 1} returned {tuple(logits.shape)} logits for {n} samples.")
        done = confidence_scores(logits, self.criterion) >= bound
        picked = done.nonzero().squeeze(1)  # the one host sync of this exit
        n_done = picked.numel()
        if n_done == 0:
            return None
        if n_done == n:
            self.answer(open_rows, logits, k)
            raise StopForward
        self.answer(open_rows.index_select(0, picked), logits.index_select(0, picked), k)
        keep = (~done).nonzero().squeeze(1)
        keep_pos = keep if self.open_pos is None else self.open_pos.index_select(0, keep)
        if not getattr(self.points[k], "shrinkable", True):
            self.open_pos = keep_pos  # the model needs its whole batch: answered samples ride along
            return None
        self.rows, self.open_pos = self.rows.index_select(0, keep_pos), None
        return _subset(value, keep_pos, m, k)


def early_exit_forward(
    model: Any, inputs: torch.Tensor, bounds: Sequence[float], criterion: str = "max_prob"
) -> EarlyExitOutput:
    """One early-exit pass of a :class:`~sd_plugin.core.MultiExitModel` (what :class:`EarlyExitModel` runs).

    Args:
        model: The model with exits (eval mode).
        inputs: (N, ...) input batch.
        bounds: One lower bound on :func:`~sd_plugin.deploy.policy.confidence_scores` per shallow exit
            (``ExitPolicy.bounds()``; ``inf``: the exit is never computed).
        criterion: 'max_prob', 'margin' or 'entropy'.
    """
    mx = single_label(as_multi_exit(model), "early exit")
    if len(bounds) != mx.num_exits:
        raise ValueError(f"got {len(bounds)} bounds for a model with {mx.num_exits} exits.")
    run = _Run(mx, inputs, bounds, criterion)
    deepest: Optional[torch.Tensor]
    try:
        with intercepting(model, run):
            deepest = mx.forward_deepest(inputs)
    except StopForward:
        deepest = None
    reached = 0
    if deepest is not None:
        if deepest.dim() != 2 or deepest.shape[0] != run.rows.numel():
            raise RuntimeError(
                f"the deepest classifier returned shape {tuple(deepest.shape)} for {run.rows.numel()} samples: "
                "this model's forward does not accept the smaller batch early exit hands on; use batch size 1."
            )
        if run.open_pos is not None:
            deepest = deepest.index_select(0, run.open_pos)
        reached = deepest.shape[0]
        run.answer(run.open_rows(), deepest, mx.num_exits)
    if run.logits is None:
        raise RuntimeError("the forward pass answered no sample: the model's exits did not run.")
    return EarlyExitOutput(run.logits, run.exit, [*run.entered, reached])


class EarlyExitModel(nn.Module):
    """Wraps a model with exits; each sample is answered by the first exit whose confidence clears its threshold.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel` (``sd_plugin.wrap(...)``, SelfDistillClassifier).
        thresholds: One per shallow exit, ``exit1`` first (``None``: that exit never answers and is not
            computed), or an :class:`ExitPolicy`.
        criterion: 'max_prob' (answer when max softmax prob >= threshold, default), 'margin' (when the top
            probability exceeds the runner-up's by >= threshold) or 'entropy' (when the softmax entropy in nats
            <= threshold). Taken from the policy when ``thresholds`` is one.

    The thresholds live in a buffer and the criterion in the extra state, so
    ``state_dict``/``load_state_dict`` keep them with the weights. A call changes
    no state of the model: one instance may be called from many threads at once.

    Example:
        >>> ee = EarlyExitModel(sd_plugin.wrap(timm.create_model("resnet18")), [0.9, 0.9, 0.9]).eval()
        >>> out = ee(images)  # out.logits (N, C), out.exit (N,): 1 = exit1, ..., num_exits + 1 = deepest
    """

    score_bounds: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        thresholds: Union[Sequence[Optional[float]], ExitPolicy],
        criterion: Optional[str] = None,
    ) -> None:
        super().__init__()
        single_label(as_multi_exit(model), "early exit")
        self.model = model
        policy = self._to_policy(thresholds, criterion)
        self.criterion = policy.criterion
        self.register_buffer("score_bounds", policy.bounds())

    def _to_policy(
        self, thresholds: Union[Sequence[Optional[float]], ExitPolicy], criterion: Optional[str]
    ) -> ExitPolicy:
        if isinstance(thresholds, ExitPolicy):
            if criterion is not None and criterion != thresholds.criterion:
                raise ValueError(f"criterion {criterion!r} conflicts with the policy's {thresholds.criterion!r}.")
            policy = thresholds
        else:
            policy = ExitPolicy(list(thresholds), criterion or "max_prob")
        if policy.num_exits != self._mx.num_exits:
            raise ValueError(
                f"got {policy.num_exits} thresholds for a model with {self._mx.num_exits} exits: give one per "
                "shallow exit (None for an exit that should never answer)."
            )
        return policy

    @property
    def _mx(self) -> MultiExitModel:
        return cast(MultiExitModel, self.model)

    @property
    def policy(self) -> ExitPolicy:
        """The current thresholds as an :class:`ExitPolicy`."""
        sign = criterion_sign(self.criterion)
        ts = [None if b == float("inf") else sign * b for b in self.score_bounds.tolist()]
        return ExitPolicy(ts, self.criterion)

    def set_policy(
        self, thresholds: Union[Sequence[Optional[float]], ExitPolicy], criterion: Optional[str] = None
    ) -> None:
        """Replace the thresholds (and criterion)."""
        policy = self._to_policy(thresholds, criterion)
        self.criterion = policy.criterion
        self.score_bounds.copy_(policy.bounds())

    def get_extra_state(self) -> Any:
        return {"criterion": self.criterion}

    def set_extra_state(self, state: Any) -> None:
        self.criterion = state["criterion"]

    def forward(self, inputs: torch.Tensor) -> EarlyExitOutput:
        if self.training:
            raise RuntimeError("EarlyExitModel is for inference: call .eval() first (batch norm needs running stats).")
        return early_exit_forward(self.model, inputs, self.score_bounds.tolist(), self.criterion)
