"""Early-exit inference: each sample leaves at the first exit confident enough, later stages are skipped.

Forward hooks on the exit points of the model's tapped module compute each exit
during the model's own forward pass, record the samples it answers and hand only
the others on to the rest of the network (a smaller batch). When no sample is
left, :class:`~sd_plugin.core.StopForward` ends the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union, cast

import torch
import torch.nn as nn

from ..core import ExitPoint, MultiExitModel, StopForward, get_submodule, select_feature
from .policy import ExitPolicy, confidence_scores

__all__ = ["EarlyExitModel", "EarlyExitOutput", "as_multi_exit"]


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
        exit_index: (N,) int64, the 0-based exit that answered; ``num_exits`` is the deepest classifier.
        samples_per_stage: Samples that reached each exit point (shallowest first), counted by
            hooks on the point's module, then the samples for which the deepest classifier
            produced logits. A stage that did not run has 0.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    samples_per_stage: List[int]

    @property
    def stages_run(self) -> int:
        """Number of exit stages (and the deepest classifier) that processed at least one sample."""
        return sum(1 for n in self.samples_per_stage if n > 0)


def _subset(value: Any, keep: torch.Tensor, batch: int, point: ExitPoint) -> Any:
    """``value`` (a hooked module's output or input tuple) with only the samples in ``keep``."""
    if isinstance(value, torch.Tensor):
        return value[keep]
    if isinstance(value, (tuple, list)):
        items = [v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v for v in value]
        return type(value)(items)
    raise TypeError(f"cannot drop answered samples from the {type(value).__name__} given by {point.module!r}.")


class _Run:
    """Book-keeping of one early-exit forward pass."""

    def __init__(self, batch: int, num_points: int, device: torch.device) -> None:
        self.remaining = torch.arange(batch, device=device)
        self.logits: Optional[torch.Tensor] = None
        self.exit_index = torch.full((batch,), num_points, dtype=torch.long, device=device)
        self.entered = [0] * num_points

    def answer(self, rows: torch.Tensor, logits: torch.Tensor, k: int) -> None:
        if self.logits is None:
            self.logits = logits.new_zeros(self.exit_index.shape[0], logits.shape[1])
        self.logits[rows] = logits
        self.exit_index[rows] = k


class EarlyExitModel(nn.Module):
    """Wraps a model with exits; each sample is answered by the first exit whose confidence clears its threshold.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel` (``sd_plugin.wrap(...)``, SelfDistillClassifier).
        thresholds: One per shallow exit (``None``: that exit never answers), or an :class:`ExitPolicy`.
        criterion: 'max_prob' (answer when max softmax prob >= threshold, default) or
            'entropy' (answer when the softmax entropy in nats <= threshold). Taken from the
            policy when ``thresholds`` is one.

    The thresholds live in a buffer and the criterion in the extra state, so
    ``state_dict``/``load_state_dict`` keep them with the weights.

    Example:
        >>> ee = EarlyExitModel(sd_plugin.wrap(timm.create_model("resnet18")), [0.9, 0.9, 0.9]).eval()
        >>> out = ee(images)  # out.logits (N, C), out.exit_index (N,)
    """

    score_bounds: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        thresholds: Union[Sequence[Optional[float]], ExitPolicy],
        criterion: Optional[str] = None,
    ) -> None:
        super().__init__()
        as_multi_exit(model)
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
        sign = 1.0 if self.criterion == "max_prob" else -1.0
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
        run = _Run(inputs.shape[0], self._mx.num_exits, inputs.device)
        handles = []
        tapped = self._mx.tapped_module()
        for k, point in enumerate(self._mx.exit_points):
            module = get_submodule(tapped, point.module)
            if point.hook == "forward_pre":
                handles.append(module.register_forward_pre_hook(self._hook(run, k, point, pre=True)))
            else:
                handles.append(module.register_forward_pre_hook(self._count(run, k)))
                handles.append(module.register_forward_hook(self._hook(run, k, point, pre=False)))
        try:
            deepest: Optional[torch.Tensor] = self._mx.forward_deepest(inputs)
        except StopForward:
            deepest = None
        finally:
            for h in handles:
                h.remove()
        reached = 0
        if deepest is not None:
            if deepest.dim() != 2 or deepest.shape[0] != run.remaining.numel():
                raise RuntimeError(
                    f"the deepest classifier returned shape {tuple(deepest.shape)} for "
                    f"{run.remaining.numel()} remaining samples: this model's forward does not accept the "
                    "smaller batch early exit hands on; use batch size 1."
                )
            reached = deepest.shape[0]
            run.answer(run.remaining, deepest, self._mx.num_exits)
        assert run.logits is not None  # every sample is answered by an exit or the deepest classifier
        return EarlyExitOutput(run.logits, run.exit_index, [*run.entered, reached])

    def _count(self, run: _Run, k: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            run.entered[k] += run.remaining.numel()

        return hook

    def _hook(self, run: _Run, k: int, point: ExitPoint, pre: bool) -> Any:
        def decide(value: Any) -> Any:
            feature = select_feature(value, point)
            batch = run.remaining.numel()
            if feature.shape[0] != batch:
                raise RuntimeError(
                    f"exit {k} at {point.module!r} got {feature.shape[0]} samples, expected {batch}: the feature's "
                    "first dimension must be the batch."
                )
            logits = self._mx.forward_exit(k, feature)
            if logits.shape[0] != batch:
                raise RuntimeError(f"exit {k} returned {tuple(logits.shape)} logits for {batch} samples.")
            done = confidence_scores(logits, self.criterion) >= self.score_bounds[k]
            if not bool(done.any()):
                return None
            run.answer(run.remaining[done], logits[done], k)
            keep = ~done
            run.remaining = run.remaining[keep]
            if run.remaining.numel() == 0:
                raise StopForward
            return _subset(value, keep, batch, point)

        if pre:

            def pre_hook(module: nn.Module, args: Any) -> Any:
                run.entered[k] += run.remaining.numel()
                return decide(args)

            return pre_hook

        def fwd_hook(module: nn.Module, args: Any, output: Any) -> Any:
            return decide(output)

        return fwd_hook
