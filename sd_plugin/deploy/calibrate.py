"""Choosing early-exit thresholds on held-out data, for an accuracy or a compute target.

Every exit's logits are collected once (:func:`collect_exit_logits`); a threshold setting is then scored without
running the model again (:func:`evaluate_policy`): which exit answers each sample, top-1, and the average cost.
:func:`calibrate` chooses the thresholds in one of two ways:

- ``'empirical'``: the cheapest (most accurate) setting that meets the target *on the calibration set*: one
  threshold shared by all exits, then coordinate descent exit by exit over quantiles of its confidence. The best
  of many settings on the same samples is optimistic: on new data the drop is typically above the target.
- ``'guaranteed'`` (the default: users read ``max_drop`` as a promise about new data): risk control as in Learn
  then Test (Angelopoulos et al. 2021). A seeded random part of the calibration set orders the settings along a
  monotone path (the greedy errors/cost frontier, from no early exit to the cheapest), so the order is fixed
  without the other part, which tests the settings along it by fixed-sequence testing (no Bonferroni penalty
  however fine the path): Clopper–Pearson bounds on the drop, Hoeffding–Bentkus on the cost
  (:mod:`sd_plugin.deploy._risk` says why). All certified settings are within the target together with
  probability >= 1 - delta; the cheapest (most accurate, for ``budget``) on the whole calibration set is returned.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core.ensemble import fit_ensemble_weights
from ..core.naming import exit_names
from . import _risk
from .early_exit import all_exit_logits, as_multi_exit, single_label
from .policy import ExitPolicy, confidence_scores, criterion_sign

__all__ = ["ExitLogits", "collect_exit_logits", "evaluate_policy", "calibrate", "METHODS", "DEFAULT_DELTA"]

METHODS = ("guaranteed", "empirical")
DEFAULT_DELTA = 0.1  # the guarantee may fail for 1 calibration set in 10
_PATH_FRACTION = 0.3  # share of the calibration set that shapes the path of settings; the rest tests it
_SPLIT_SEED = 0  # the split is random (data loaders may be sorted by class) but reproducible
_MAX_ELEMENTS = 1 << 22  # per chunk of batched threshold evaluation (K x N exit indices)
_EPS = 1e-12


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
        logits.append(all_exit_logits(mx, images).float().cpu())
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
    """Fast evaluation of threshold settings on fixed logits, one setting or a batch of them at once."""

    def __init__(self, data: ExitLogits, criterion: str, costs: torch.Tensor) -> None:
        self.criterion = criterion
        self.scores = confidence_scores(data.logits[:-1], criterion)
        self.num_classes = data.logits.shape[-1]
        self.correct = (data.logits.argmax(dim=-1) == data.targets).double()
        self.costs = costs
        self.cols = torch.arange(data.logits.shape[1])
        self.n = data.logits.shape[1]

    def subset(self, idx: torch.Tensor) -> _Scorer:
        """The same scorer on the samples ``idx``."""
        out = copy.copy(self)
        out.scores, out.correct = self.scores[:, idx], self.correct[:, idx]
        out.n = idx.numel()
        out.cols = torch.arange(out.n)
        return out

    def assign(self, bounds: torch.Tensor) -> torch.Tensor:
        """(K, N) answering exit per sample for K settings of bounds (K, E), as :func:`exit_decisions`."""
        e, n = self.scores.shape
        if bounds.dim() != 2 or bounds.shape[1] != e:
            raise ValueError(f"bounds must be (K, {e}), got {tuple(bounds.shape)}.")
        step = max(1, _MAX_ELEMENTS // max(1, n))
        out = []
        for chunk in bounds.split(step):
            idx = torch.full((chunk.shape[0], n), e, dtype=torch.long)
            for k in range(e - 1, -1, -1):  # the shallowest exit that clears its bound wins
                idx = torch.where(self.scores[k][None] >= chunk[:, k, None], k, idx)
            out.append(idx)
        return torch.cat(out)

    def sums(self, bounds: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(V, K) sums over the samples of ``values`` (V, E + 1, N) at the exit each of K settings picks."""
        idx = self.assign(bounds)
        return torch.stack([v[idx, self.cols].sum(dim=1) for v in values])

    def batch(self, bounds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K,) top-1 (percent) and (K,) average cost of K settings of bounds (K, E)."""
        idx = self.assign(bounds)
        return self.correct[idx, self.cols].sum(dim=1) * 100 / self.n, self.costs[idx].sum(dim=1) / self.n


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
    idx = scorer.assign(policy.bounds()[None])[0]
    top1, cost = (float(v) for v in scorer.batch(policy.bounds()[None]))
    deepest = float(scorer.correct[-1].mean()) * 100
    share = torch.bincount(idx, minlength=data.num_exits + 1).double() / idx.numel()
    shares = dict(zip(exit_names(data.num_exits), share.tolist()))
    return {"top1": top1, "deepest_top1": deepest, "drop": deepest - top1, "cost": cost, "exit_share": shares}


def _candidates(scores: torch.Tensor, n: int) -> torch.Tensor:
    q = torch.quantile(scores.double(), torch.linspace(0, 1, n, dtype=torch.float64)).float()
    return torch.cat([q, torch.tensor([float("inf")])]).unique()


_Key = Callable[[float, float], Tuple[bool, float, float]]


def _better(scorer: _Scorer, key: _Key, trials: torch.Tensor, best: torch.Tensor) -> Tuple[torch.Tensor, Tuple]:
    """The first of ``trials`` (K, E) with the smallest key, if it beats ``best``; else ``best``."""
    top1, cost = (v.tolist() for v in scorer.batch(torch.cat([best[None], trials])))
    best_key = key(top1[0], cost[0])
    for j in range(trials.shape[0]):
        k_ = key(top1[j + 1], cost[j + 1])
        if k_ < best_key:
            best, best_key = trials[j].clone(), k_
    return best, best_key


def _search(
    scorer: _Scorer, max_drop: Optional[float], budget: Optional[float], num_candidates: int, rounds: int
) -> torch.Tensor:
    """Empirical search: one threshold shared by all exits, then coordinate descent exit by exit."""
    floor = float(scorer.correct[-1].mean()) * 100 - (max_drop or 0.0)

    def key(top1: float, cost: float) -> Tuple[bool, float, float]:  # smaller is better
        if max_drop is not None:
            return (top1 < floor - 1e-9, cost, -top1)
        return (cost > (budget or 0.0) + _EPS, -top1, cost)

    num_exits = scorer.scores.shape[0]
    cands = [_candidates(scorer.scores[k], num_candidates) for k in range(num_exits)]
    shared = torch.cat(cands).unique().double()
    best = torch.full((num_exits,), float("inf"), dtype=torch.float64)
    best, best_key = _better(scorer, key, shared[:, None].expand(-1, num_exits), best)
    for _ in range(rounds):
        improved = False
        for k in range(num_exits):
            trials = best.repeat(cands[k].numel(), 1)
            trials[:, k] = cands[k].double()
            new, new_key = _better(scorer, key, trials, best)
            if new_key < best_key:
                best, best_key, improved = new, new_key, True
        if not improved:
            break
    if best_key[0]:
        raise ValueError("no thresholds meet the target on this data; loosen it.")
    return best


def _step_rank(added: float, saved: float) -> Tuple[int, float, float]:
    """Order of a path step: free steps first, then loss added per cost saved (ties: more saved), then the rest."""
    if saved > _EPS:
        return (1, added / saved, -saved)
    return (0, added, 0.0) if added <= 0 else (2, added, -saved)


def _frontier(scorer: _Scorer, loss: torch.Tensor, steps: int) -> torch.Tensor:
    """Threshold settings (P, E) from "no exit answers" to "every exit at its lowest candidate", greedily.

    Each step lowers one exit's threshold to its next quantile, the one that saves the most cost per unit of
    ``loss`` (E + 1, N) added on these samples, so the path walks the loss/cost frontier and is monotone.
    """
    num_exits = scorer.scores.shape[0]
    cands = [_candidates(scorer.scores[k], steps).flip(0).double() for k in range(num_exits)]
    ladder = torch.nn.utils.rnn.pad_sequence(cands, batch_first=True, padding_value=-math.inf)  # (E, L)
    pos, last = [0] * num_exits, [c.numel() - 1 for c in cands]
    bounds = torch.full((num_exits,), float("inf"), dtype=torch.float64)
    path = [bounds.clone()]
    values = torch.stack([loss.double(), scorer.costs[:, None].expand_as(loss)])  # (2, E + 1, N)
    idx = torch.full((scorer.n,), num_exits, dtype=torch.long)  # the exit answering each sample now
    rows = torch.arange(num_exits)
    while any(p < q for p, q in zip(pos, last)):
        nxt = ladder[rows, torch.tensor([min(p + 1, q) for p, q in zip(pos, last)])]
        moved = (idx[None] > rows[:, None]) & (scorer.scores >= nxt[:, None])  # (E, N): to exit k if lowered
        loss_up, cost_up = ((values[:, :-1] - values[:, idx, scorer.cols][:, None]) * moved).sum(dim=-1).tolist()
        k = min((_step_rank(loss_up[j], -cost_up[j]), j) for j in range(num_exits) if pos[j] < last[j])[1]
        bounds[k], pos[k] = nxt[k], pos[k] + 1
        idx[moved[k]] = k
        path.append(bounds.clone())
    return torch.stack(path)


def _guaranteed(
    scorer: _Scorer, max_drop: Optional[float], budget: Optional[float], delta: float, steps: int
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Thresholds whose expected drop (or cost) on new data is within the target with probability >= 1 - delta."""
    n = scorer.n
    n_path = int(round(n * _PATH_FRACTION))
    if n_path < 1 or n - n_path < 1:
        raise ValueError(f"{n} calibration samples are too few for method='guaranteed'; collect more held-out data.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    fit, test = scorer.subset(perm[:n_path]), scorer.subset(perm[n_path:])
    path = _frontier(fit, 1 - fit.correct, steps)  # from no early exit (exact: drop 0) to the cheapest
    c, m = scorer.costs, test.n
    if max_drop is not None:
        target, unit, alpha = max_drop, "max_drop", max_drop / 100
        right = test.correct[-1:]
        counts = test.sums(path, torch.stack([right * (1 - test.correct), (1 - right) * test.correct])).round().long()

        def bound(i: slice) -> torch.Tensor:  # points of top-1 drop
            return 100 * _risk.drop_upper_bound(counts[0, i], counts[1, i], m, delta)

        def passes(i: slice) -> torch.Tensor:
            return bound(i) <= max_drop

        need = _risk.samples_needed(float(counts[0, 1]) / m if path.shape[0] > 1 else 1.0, alpha, delta / 2)
        procedure = "Clopper-Pearson bounds on lost minus gained samples (delta/2 each)"
    else:
        assert budget is not None
        target, unit, lo, span = budget, "budget", float(c.min()), float(c.max() - c.min())
        # first: every sample at exit1, a bound every score clears (max prob, margin >= 0; -entropy >= -log(C) - 1)
        always = 0.0 if criterion_sign(scorer.criterion) > 0 else -(math.log(scorer.num_classes) + 1)
        path = torch.cat([torch.full((1, path.shape[1]), always, dtype=torch.float64), path.flip(0)])
        rates = (test.batch(path)[1] - lo) / span if span > 0 else torch.zeros(path.shape[0], dtype=torch.float64)
        alpha = (budget - lo) / span if span > 0 else 1.0

        def bound(i: slice) -> torch.Tensor:  # cost units
            return lo + span * _risk.hoeffding_bentkus_upper(rates[i], m, delta) if span > 0 else c[:1]

        def passes(i: slice) -> torch.Tensor:  # the same test as bound(i) <= budget, without the bisection
            return _risk.hoeffding_bentkus_pvalue(rates[i], m, torch.tensor(alpha)) <= delta

        need = _risk.samples_needed(float(rates[1]), alpha, delta) if path.shape[0] > 1 else math.inf
        procedure = "Hoeffding-Bentkus bounds on the cost rescaled to [0, 1]"
    # the first setting is exact (nothing exits early: drop 0; everything at exit1: cost c[0]); test the others
    certified = 1 + _risk.fixed_sequence(lambda i: passes(slice(i.start + 1, i.stop + 1)), path.shape[0] - 1)
    if certified <= 1:
        if target <= 0 and max_drop is not None:
            hint = "no calibration set certifies a zero drop for any early exit"
        elif math.isfinite(need):
            hint = f"{unit}={target} needs at least about {math.ceil(need / (1 - _PATH_FRACTION))} calibration samples"
        else:
            hint = f"no calibration set certifies {unit}={target}: the safest early exit already exceeds it here"
        smallest = float(bound(slice(1, 2))[0]) if path.shape[0] > 1 else math.nan
        raise ValueError(
            f"method='guaranteed' cannot certify any early exit within {unit}={target} with probability "
            f"{1 - delta:.0%} from {n} calibration samples (delta={delta}): the smallest {unit} this data "
            f"certifies is about {smallest:.3g}, and {hint}. Loosen {unit}, calibrate on more held-out data, "
            "raise delta, or use method='empirical' (fitted to the calibration set, no guarantee on new data)."
        )
    top1, cost = scorer.batch(path[:certified])
    order = torch.stack([cost, -top1] if max_drop is not None else [-top1, cost], dim=1).tolist()
    j = min(range(certified), key=order.__getitem__)  # all certified ones hold: the best on all the data
    guarantee = dict(risk="drop" if max_drop is not None else "cost", bound=float(bound(slice(j, j + 1))[0]))
    guarantee.update(confidence=1 - delta, procedure=f"fixed-sequence testing (Learn then Test) on a path; {procedure}")
    guarantee.update(num_path_samples=n_path, num_test_samples=m, path_length=path.shape[0], certified=certified)
    return path[j], guarantee


def calibrate(
    data: ExitLogits,
    *,
    max_drop: Optional[float] = None,
    budget: Optional[float] = None,
    costs: Optional[Sequence[float]] = None,
    criterion: str = "max_prob",
    method: str = "guaranteed",
    delta: float = DEFAULT_DELTA,
    num_candidates: int = 101,
    rounds: int = 3,
) -> ExitPolicy:
    """Thresholds that meet a target on new data (``method='guaranteed'``) or on ``data`` (``'empirical'``).

    The returned policy also carries the calibrated ensemble's weights (``ensemble_weights``), fitted on the same
    ``data`` by :func:`~sd_plugin.core.ensemble.fit_ensemble_weights`.

    Give exactly one target:

    - ``max_drop``: the largest top-1 drop (percentage points) below the deepest exit that
      is acceptable; the cheapest thresholds within it are chosen.
    - ``budget``: the largest average cost, in the units of ``costs`` (with
      ``ExitCosts.answer_fractions()``: a fraction of the plain model's FLOPs, e.g. 0.6);
      the most accurate thresholds within it are chosen.

    Methods:

    - ``'guaranteed'`` (default): with probability >= ``1 - delta`` over the draw of the calibration set, the
      expected drop (or average cost) on new data from the same distribution is within the target (how: the
      module docstring). When no early exit can be certified, raises ``ValueError`` naming the smallest target
      the data certifies and about how many calibration samples the target needs.
    - ``'empirical'``: the best thresholds that meet the target on ``data`` itself; optimistic on new data.

    Args:
        data: Logits from :func:`collect_exit_logits` on held-out data.
        costs: Cost of answering at each exit (E + 1), e.g.
            ``exit_costs(model, example).answer_fractions()``. Needed for ``budget``; for
            ``max_drop`` the default (exit k costs (k+1)/(E+1)) just prefers shallower exits.
        criterion: 'max_prob', 'margin' or 'entropy' (:data:`~sd_plugin.deploy.policy.CRITERIA`).
        method: 'guaranteed' or 'empirical'.
        delta: Allowed probability that the guarantee fails (``'guaranteed'`` only), in (0, 1).
        num_candidates: Quantiles of each exit's confidence tried as thresholds.
        rounds: Passes of per-exit refinement (``'empirical'``).

    Returns:
        The :class:`ExitPolicy`; ``info`` holds the method, the target, the top-1/cost it reaches on ``data``
        (``'calibration'``) and, for ``'guaranteed'``, ``delta`` and ``'guarantee'`` (the bound reached, the
        confidence, the sample counts and the procedure).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta is the allowed failure probability, in (0, 1), e.g. 0.1; got {delta}.")
    if (max_drop is None) == (budget is None):
        raise ValueError("give exactly one target: max_drop (top-1 points) or budget (average cost, units of costs).")
    if costs is None and budget is not None:
        raise ValueError("a compute budget needs costs: pass costs=exit_costs(model, example).answer_fractions().")
    c = _check_costs(costs, data.num_exits)
    if max_drop is not None and not 0 <= max_drop < 100:
        raise ValueError(f"max_drop is in top-1 points, in [0, 100), got {max_drop}.")
    if budget is not None and (budget < float(c[0]) - _EPS or budget <= 0):
        raise ValueError(
            f"budget {budget} is below the cost of answering everything at the first exit ({float(c[0]):.3f}); "
            "raise the budget."
        )
    scorer = _Scorer(data, criterion, c)
    info: Dict[str, Any] = {"method": method}
    if method == "guaranteed":
        best, guarantee = _guaranteed(scorer, max_drop, budget, delta, num_candidates)
        info.update(delta=delta, guarantee=guarantee)
    else:
        best = _search(scorer, max_drop, budget, num_candidates, rounds)
    sign = criterion_sign(criterion)
    thresholds = [None if b == float("inf") else sign * float(b) for b in best.tolist()]
    fit = fit_ensemble_weights(data.logits, data.targets, delta=delta)  # same held-out data: saved with the policy
    policy = ExitPolicy(thresholds, criterion, ensemble_weights=fit.weights)
    stats = evaluate_policy(data, policy, c.tolist())
    target = {"max_drop": max_drop} if max_drop is not None else {"budget": budget}
    info["ensemble"] = {"chosen": fit.chosen, "fitted": fit.fitted, "cv_top1": fit.cv_top1, "p_value": fit.p_value}
    policy.info = {"target": target, **info, "calibration": {**stats, "num_samples": int(data.targets.numel())}}
    return policy
