"""The ensemble of all classifiers: BYOT's equal-weight mean of logits, or weights fitted on held-out data.

One definition for the library, the metrics, the report and the benchmark: the ensemble's logits are
``sum_k w_k * z_k`` over the classifiers ``exit1 ... exitE, deepest``. BYOT's released code uses equal weights
``w_k = 1 / (E + 1)`` (``sum(outputs) / len(outputs)``; github.com/ArchipLab-LinfengZhang/
pytorch-self-distillation-final, train.py). On short schedules a weak ``exit1`` pulls that mean below the deepest
classifier; :func:`fit_ensemble_weights` fits non-negative weights on held-out (calibration) data instead, by
minimising the ensemble's cross-entropy (stacking, Wolpert 1992; the weights' common scale acts as a
temperature), and keeps them only when they beat the deepest classifier alone in cross-validation on that data by
more than chance: an exact one-sided sign test (McNemar's) on the samples where the two disagree, at level
``delta``. Otherwise the weights select the deepest classifier alone. A fitted ensemble that is no better than the
deepest is thus chosen with probability at most ``delta``; a real gain too small for the calibration set to show
is given up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "ensemble_logits",
    "equal_weights",
    "deepest_only",
    "fit_ensemble_weights",
    "EnsembleFit",
    "sign_test_p_value",
]

#: Folds of the cross-validation that decides between the fitted weights and the deepest classifier alone.
CV_FOLDS = 5
#: L-BFGS iterations per fit (E + 1 parameters: it converges in a few dozen).
FIT_STEPS = 100
#: Ridge on the log-weights towards the equal-weight start, per sample: keeps a weight of an exit that never
#: matters from drifting to 0 or infinity on separable data.
LOG_WEIGHT_RIDGE = 1e-3
#: Seed of the fold assignment (the result must not depend on the caller's RNG state).
FOLD_SEED = 0
#: Level of the sign test that lets the fitted weights replace the deepest classifier (calibrate()'s delta).
DEFAULT_SWITCH_DELTA = 0.1

LogitsLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def _stack(logits: LogitsLike) -> torch.Tensor:
    z = logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits))
    if z.dim() != 3:
        raise ValueError(f"logits must be (E + 1, N, C) or a list of (N, C), got shape {tuple(z.shape)}.")
    return z.float()


def equal_weights(num_classifiers: int) -> List[float]:
    """BYOT's ensemble: every classifier (exits and the deepest) weighs ``1 / num_classifiers``."""
    return [1.0 / num_classifiers] * num_classifiers


def deepest_only(num_classifiers: int) -> List[float]:
    """Weights that make the ensemble the deepest classifier alone."""
    return [0.0] * (num_classifiers - 1) + [1.0]


def ensemble_logits(
    logits: LogitsLike, weights: Optional[Sequence[float]] = None, multi_label: bool = False
) -> torch.Tensor:
    """The ensemble's float32 logits ``sum_k w_k z_k`` (equal weights by default: BYOT's mean of logits).

    Args:
        logits: (E + 1, N, C) or a list of (N, C): ``exit1`` ... ``exitE``, then the deepest classifier. Log-
            probabilities work as well (each differs from its logits by a per-sample constant, which the softmax
            ignores).
        weights: One non-negative weight per classifier (``None``: equal weights).
        multi_label: Sigmoid heads: the weighted logits are returned as they are. Single-label: the log of their
            softmax (clamped, no -inf), so the result's softmax is the ensemble's probabilities.
    """
    z = _stack(logits)
    w = torch.tensor(equal_weights(z.shape[0]) if weights is None else list(weights), dtype=torch.float32)
    if w.shape != (z.shape[0],):
        raise ValueError(f"got {w.numel()} ensemble weights for {z.shape[0]} classifiers (exits and the deepest).")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"ensemble weights must be finite, non-negative and not all zero, got {w.tolist()}.")
    mixed = torch.einsum("k,knc->nc", w.to(z.device), z)
    return mixed if multi_label else mixed.softmax(dim=1).clamp_min(1e-12).log()


@dataclass(frozen=True)
class EnsembleFit:
    """Result of :func:`fit_ensemble_weights`.

    Attributes:
        weights: One weight per classifier (``exit1`` first, the deepest last): the fitted ones, or
            :func:`deepest_only` when they did not beat the deepest classifier in cross-validation.
        fitted: The weights the full calibration set gives (kept for the record even when not used).
        chosen: ``'fitted'`` or ``'deepest'``.
        cv_top1: Cross-validated top-1 (percent) of the fitted ensemble, of the deepest classifier and of the
            equal-weight ensemble on the calibration data.
        num_samples: Calibration samples.
        p_value: One-sided sign-test p-value of "the fitted ensemble is right more often than the deepest" over
            the cross-validated samples where exactly one of them is right.
    """

    weights: List[float]
    fitted: List[float]
    chosen: str
    cv_top1: Dict[str, float]
    num_samples: int
    p_value: float


def sign_test_p_value(wins: int, losses: int) -> float:
    """P(X >= wins) for X ~ Binomial(wins + losses, 1/2): the exact one-sided sign test (McNemar's test)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def _fit(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-negative weights (E + 1,) minimising the cross-entropy of ``sum_k w_k z_k`` (``w = exp(a)``)."""
    start = torch.log(torch.tensor(equal_weights(z.shape[0])))
    a = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([a], max_iter=FIT_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(torch.einsum("k,knc->nc", a.exp(), z), y) + LOG_WEIGHT_RIDGE * (a - start).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return a.detach().exp()


def _right(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("k,knc->nc", w, z).argmax(dim=1) == y


def fit_ensemble_weights(
    logits: LogitsLike, targets: torch.Tensor, folds: int = CV_FOLDS, delta: float = DEFAULT_SWITCH_DELTA
) -> EnsembleFit:
    """Ensemble weights fitted on held-out data, chosen over the deepest classifier only when they beat it.

    The weights are fitted by cross-entropy on ``folds - 1`` folds and scored on the remaining one, for every
    fold. They replace the deepest classifier when, over the cross-validated samples where exactly one of the two
    is right, the fitted ensemble wins significantly more often (one-sided exact sign test at level ``delta``);
    then the weights fitted on all the data are returned. Otherwise the ensemble is the deepest classifier alone.

    Args:
        logits: (E + 1, N, C) logits on the calibration set (``ExitLogits.logits``), the deepest last.
        targets: (N,) int64 labels.
        folds: Cross-validation folds (>= 2, at most N).
        delta: Level of the sign test, in (0, 1): the chance of choosing fitted weights that are no better than
            the deepest classifier.

    Example:
        >>> fit = fit_ensemble_weights(calib.logits, calib.targets)   # calib = collect_exit_logits(model, loader)
        >>> test_logits = ensemble_logits(test.logits, fit.weights)
    """
    z = _stack(logits).detach()
    y = targets.reshape(-1).long()
    if y.shape != (z.shape[1],):
        raise ValueError(f"targets must be ({z.shape[1]},), got {tuple(targets.shape)}.")
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= z.shape[1]:
        raise ValueError(f"folds must be an int in [2, {z.shape[1]}] (the number of samples), got {folds!r}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r} (default {DEFAULT_SWITCH_DELTA}).")
    order = torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(FOLD_SEED))
    fold_of = torch.empty_like(order)
    fold_of[order] = torch.arange(z.shape[1]) % folds
    right = {name: torch.zeros(z.shape[1], dtype=torch.bool) for name in ("fitted", "deepest", "equal")}
    deep, equal = torch.tensor(deepest_only(z.shape[0])), torch.tensor(equal_weights(z.shape[0]))
    for f in range(folds):
        train, held = fold_of != f, fold_of == f
        w = _fit(z[:, train], y[train])
        for name, weights in (("fitted", w), ("deepest", deep), ("equal", equal)):
            right[name][held] = _right(z[:, held], y[held], weights)
    cv = {k: float(v.float().mean()) * 100 for k, v in right.items()}
    wins = int((right["fitted"] & ~right["deepest"]).sum())
    losses = int((right["deepest"] & ~right["fitted"]).sum())
    p_value = sign_test_p_value(wins, losses)
    fitted = _fit(z, y)
    use = p_value <= delta
    return EnsembleFit(
        weights=fitted.tolist() if use else deepest_only(z.shape[0]),
        fitted=fitted.tolist(),
        chosen="fitted" if use else "deepest",
        cv_top1=cv,
        num_samples=int(z.shape[1]),
        p_value=p_value,
    )
