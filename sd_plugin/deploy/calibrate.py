"""Choosing early-exit thresholds on held-out data, for an accuracy or a compute target.

Every exit's logits are collected once (:func:`collect_exit_logits`); a
threshold setting is then scored without running the model again
(:func:`evaluate_policy`): which exit answers each sample, top-1, and the average
cost. :func:`calibrate` searches the thresholds: first one threshold shared by
all exits, then exit by exit (coordinate descent over quantiles of that exit's
confidence), keeping the target satisfied on the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._numbering import exit_names
from .early_exit import as_multi_exit, forward_with_features, single_label
from .policy import ExitPolicy, confidence_scores, exit_decisions

__all__ = ["ExitLogits", "collect_exit_logits", "evaluate_policy", "calibrate"]


@dataclass
class ExitLogits:
    """Logits of every exit and the deepest classifier on a labelled set.

    Attributes:
        logits: (E + 1, N, C): the E shallow exits (``exit1`` first), then the deepest classifier.
        targets: (N,) int64 labels.
    """

    logits: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if self.logits.dim() != 3 or self.logits.shape[0] < 2:
            raise ValueError(f"logits must be (E + 1, N, C) with E >= 1, got {tuple(self.logits.shape)}.")
        if self.targets.shape != (self.logits.shape[1],):
            raise ValueError(f"targets must be ({self.logits.shape[1]},), got {tuple(self.targets.shape)}.")

    @property
    def num_exits(self) -> int:
        """Shallow exits (E)."""
        return self.logits.shape[0] - 1

    def split(self, fraction: float = 0.5) -> Tuple[ExitLogits, ExitLogits]:
        """The first ``fraction`` of the samples and the rest (e.g. calibrate on one, evaluate on the other)."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
        n = int(round(self.logits.shape[1] * fraction))
        return (
            ExitLogits(self.logits[:, :n], self.targets[:n]),
            ExitLogits(self.logits[:, n:], self.targets[n:]),
        )

    @property
    def names(self) -> List[str]:
        """The training log's names of the rows of :attr:`logits`: ``exit1`` ... ``exitE``, ``deepest``."""
        return exit_names(self.num_exits)

    def top1(self) -> torch.Tensor:
        """(E + 1,) top-1 accuracy (percent) of every exit, in the order of :attr:`names`."""
        return (self.logits.argmax(dim=-1) == self.targets).float().mean(dim=1) * 100


@torch.no_grad()
def collect_exit_logits(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> ExitLogits:
    """Run ``model`` once over ``batches`` of (images, labels) and keep every exit's logits.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel`, put in eval mode by the caller.
        batches: Iterable of (images (N, 3, H, W), labels (N,)), e.g. a DataLoader.
    """
    mx = single_label(as_multi_exit(model), "exit calibration")
    logits: List[torch.Tensor] = []
    targets: List[torch.Tensor] = []
    for images, labels in batches:
        deepest, features = forward_with_features(mx, images)
        per_exit = [mx.forward_exit(k, f) for k, f in enumerate(features)]
        logits.append(torch.stack([*per_exit, deepest]).float().cpu())
        targets.append(labels.cpu().long())
    if not logits:
        raise ValueError("no batches: the data loader is empty.")
    return ExitLogits(torch.cat(logits, dim=1), torch.cat(targets))


def _check_costs(costs: Optional[Sequence[float]], num_exits: int) -> torch.Tensor:
    if costs is None:
        return torch.arange(1, num_exits + 2, dtype=torch.float64) / (num_exits + 1)
    c = torch.as_tensor(list(costs), dtype=torch.float64)
    if c.shape != (num_exits + 1,):
        raise ValueError(f"costs must give one value per exit plus the deepest ({num_exits + 1}), got {len(c)}.")
    if bool((c <= 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError(f"costs must be finite and > 0, got {c.tolist()}.")
    return c


class _Scorer:
    """Fast evaluation of threshold settings on fixed logits."""

    def __init__(self, data: ExitLogits, criterion: str, costs: torch.Tensor) -> None:
        self.scores = confidence_scores(data.logits[:-1], criterion)
        self.correct = (data.logits.argmax(dim=-1) == data.targets).double()
        self.costs = costs
        self.cols = torch.arange(data.logits.shape[1])

    def __call__(self, bounds: torch.Tensor) -> Tuple[float, float, torch.Tensor]:
        idx = exit_decisions(self.scores, bounds)
        top1 = float(self.correct[idx, self.cols].mean()) * 100
        return top1, float(self.costs[idx].mean()), idx


def evaluate_policy(data: ExitLogits, policy: ExitPolicy, costs: Optional[Sequence[float]] = None) -> Dict[str, object]:
    """Top-1, average cost and exit shares of ``policy`` on ``data``.

    Args:
        data: Collected logits.
        policy: Thresholds to score.
        costs: Cost of answering at each exit (E + 1 values, e.g. ``ExitCosts.answer_fractions()``:
            FLOPs including the exits evaluated before, as a fraction of the plain model's).
            Default: exit k costs (k+1)/(E+1).

    Returns:
        dict with 'top1', 'deepest_top1', 'drop' (points), 'cost' (average of ``costs`` over the
        samples) and 'exit_share': the fraction of samples answered by each exit, keyed by the training
        log's names (``{'exit1': ..., 'exitE': ..., 'deepest': ...}``, shallowest first).
    """
    if policy.num_exits != data.num_exits:
        raise ValueError(f"policy has {policy.num_exits} thresholds but the data has {data.num_exits} exits.")
    scorer = _Scorer(data, policy.criterion, _check_costs(costs, data.num_exits))
    top1, cost, idx = scorer(policy.bounds())
    deepest = float(scorer.correct[-1].mean()) * 100
    share = torch.bincount(idx, minlength=data.num_exits + 1).double() / idx.numel()
    shares = dict(zip(exit_names(data.num_exits), share.tolist()))
    return {"top1": top1, "deepest_top1": deepest, "drop": deepest - top1, "cost": cost, "exit_share": shares}


def _candidates(scores: torch.Tensor, n: int) -> torch.Tensor:
    q = torch.quantile(scores.double(), torch.linspace(0, 1, n, dtype=torch.float64)).float()
    return torch.cat([q, torch.tensor([float("inf")])]).unique()


def calibrate(
    data: ExitLogits,
    *,
    max_drop: Optional[float] = None,
    budget: Optional[float] = None,
    costs: Optional[Sequence[float]] = None,
    criterion: str = "max_prob",
    num_candidates: int = 101,
    rounds: int = 3,
) -> ExitPolicy:
    """Thresholds that meet a target on ``data`` (the calibration set).

    Give exactly one target:

    - ``max_drop``: the largest top-1 drop (percentage points) below the deepest exit that
      is acceptable; the cheapest thresholds within it are chosen.
    - ``budget``: the largest average cost, in the units of ``costs`` (with
      ``ExitCosts.answer_fractions()``: a fraction of the plain model's FLOPs, e.g. 0.6);
      the most accurate thresholds within it are chosen.

    Args:
        data: Logits from :func:`collect_exit_logits` on held-out data.
        costs: Cost of answering at each exit (E + 1), e.g.
            ``exit_costs(model, example).answer_fractions()``. Needed for ``budget``; for
            ``max_drop`` the default (exit k costs (k+1)/(E+1)) just prefers shallower exits.
        criterion: 'max_prob' or 'entropy'.
        num_candidates: Quantiles of each exit's confidence tried as thresholds.
        rounds: Passes of per-exit refinement.

    Returns:
        The :class:`ExitPolicy`; ``info`` holds the target and the top-1/cost it reaches on ``data``.
    """
    if (max_drop is None) == (budget is None):
        raise ValueError("give exactly one target: max_drop (top-1 points) or budget (average cost, units of costs).")
    if costs is None and budget is not None:
        raise ValueError("a compute budget needs costs: pass costs=exit_costs(model, example).answer_fractions().")
    c = _check_costs(costs, data.num_exits)
    scorer = _Scorer(data, criterion, c)
    deepest = float(scorer.correct[-1].mean()) * 100
    if max_drop is not None:
        if not 0 <= max_drop < 100:
            raise ValueError(f"max_drop is in top-1 points, in [0, 100), got {max_drop}.")
        floor = deepest - max_drop

        def key(top1: float, cost: float) -> Tuple[bool, float, float]:  # smaller is better
            return (top1 < floor - 1e-9, cost, -top1)

    else:
        assert budget is not None
        if budget < float(c[0]) - 1e-12 or budget <= 0:
            raise ValueError(
                f"budget {budget} is below the cost of answering everything at the first exit ({float(c[0]):.3f}); "
                "raise the budget."
            )

        def key(top1: float, cost: float) -> Tuple[bool, float, float]:
            return (cost > budget + 1e-12, -top1, cost)

    cands = [_candidates(scorer.scores[k], num_candidates) for k in range(data.num_exits)]
    shared = torch.cat(cands).unique()
    best = torch.full((data.num_exits,), float("inf"), dtype=torch.float64)
    best_key = key(*scorer(best)[:2])
    for t in shared:
        bounds = torch.full((data.num_exits,), float(t), dtype=torch.float64)
        k_ = key(*scorer(bounds)[:2])
        if k_ < best_key:
            best, best_key = bounds, k_
    for _ in range(rounds):
        improved = False
        for k in range(data.num_exits):
            for t in cands[k]:
                bounds = best.clone()
                bounds[k] = t
                k_ = key(*scorer(bounds)[:2])
                if k_ < best_key:
                    best, best_key, improved = bounds, k_, True
        if not improved:
            break
    if best_key[0]:
        raise ValueError("no thresholds meet the target on this data; loosen it.")
    sign = 1.0 if criterion == "max_prob" else -1.0
    thresholds = [None if b == float("inf") else sign * float(b) for b in best.tolist()]
    policy = ExitPolicy(thresholds, criterion)
    stats = evaluate_policy(data, policy, c.tolist())
    target = {"max_drop": max_drop} if max_drop is not None else {"budget": budget}
    policy.info = {"target": target, "calibration": {**stats, "num_samples": int(data.targets.numel())}}
    return policy
