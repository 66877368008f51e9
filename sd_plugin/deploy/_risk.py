"""Finite-sample risk control for early-exit thresholds: confidence bounds and fixed-sequence testing.

Distribution-free confidence bounds on the mean of a bounded per-sample loss, and the multiple-testing step that
turns them into a guarantee for a threshold setting chosen from many:

- **Binary rates (the two parts of the top-1 drop).** A count of events among n independent samples is
  Binomial(n, p); inverting its exact tail gives the Clopper–Pearson bounds (Clopper & Pearson, Biometrika 1934).
  Exact, so no bound valid for every distribution is tighter. The drop of a policy is the rate of samples the
  deepest classifier gets right and the policy wrong minus the rate of the reverse; an upper bound on the first at
  delta / 2 minus a lower bound on the second at delta / 2 is an upper bound on the drop at delta (union bound).
  Bounding only the first part would also be valid, but it ignores the samples an exit gets right where the deepest
  is wrong, which on trained models are as frequent as the drops users ask for, so it would be far too cautious.
- **Losses in [0, 1] (the rescaled compute cost).** The Hoeffding–Bentkus p-value of Bates, Angelopoulos, Lei,
  Malik & Jordan, "Distribution-free, risk-controlling prediction sets" (JACM 2021): the smaller of Hoeffding's
  (1963) exponential bound in its Kullback–Leibler form and Bentkus's (2004) binomial-tail bound, valid for any
  distribution on [0, 1] and close to exact when the variance is small.
- **Choosing among candidates.** Angelopoulos, Bates, Candès, Jordan & Lei, "Learn then Test: calibrating
  predictive algorithms to achieve risk control" (arXiv:2110.01052, 2021): a candidate is certified when the null
  "its risk exceeds the target" is rejected; with the candidates in an order fixed before the test samples are
  seen, fixed-sequence testing (each null at the full level delta, stopping at the first that is not rejected)
  keeps the family-wise error rate at delta, so all certified candidates are within the target together with
  probability >= 1 - delta, and a long, fine path costs no Bonferroni penalty.

Plain float64 torch/``math`` (no scipy).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch

__all__ = [
    "binomial_cdf",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "drop_upper_bound",
    "fixed_sequence",
    "hoeffding_bentkus_pvalue",
    "hoeffding_bentkus_upper",
    "samples_needed",
]

_BISECTION_STEPS = 48  # halvings of [0, 1]: to 4e-15, far below any rate a calibration set resolves
_TEST_CHUNK = 32  # settings tested at a time by fixed_sequence (testing stops at the first failure)
_CACHE_SIZE = 100_000  # memoized Clopper-Pearson bounds, keyed by (kind, count, n, delta)
_CACHE: Dict[Tuple[str, int, int, float], float] = {}


def _check(n: int, delta: float) -> None:
    if n < 1:
        raise ValueError(f"need at least one sample, got n={n}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta (the allowed failure probability) must be in (0, 1), got {delta}.")


def binomial_cdf(k: torch.Tensor, n: int, p: torch.Tensor) -> torch.Tensor:
    """P(Binomial(n, p) <= k), elementwise over k (int) and p (float), exact up to float64 rounding."""
    k, p = torch.broadcast_tensors(torch.as_tensor(k).long(), torch.as_tensor(p, dtype=torch.float64))
    top = int(k.clamp(0, n).max()) if k.numel() else 0
    i = torch.arange(top + 1, dtype=torch.float64)
    log_choose = math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
    pp = p.reshape(-1, 1)
    log_pmf = log_choose + torch.xlogy(i, pp) + torch.special.xlog1py(n - i, -pp)
    log_pmf = log_pmf.masked_fill(i > k.reshape(-1, 1), -math.inf)
    cdf = torch.logsumexp(log_pmf, dim=1).exp().clamp(max=1.0).reshape(k.shape)
    return torch.where(k < 0, 0.0, torch.where(k >= n, 1.0, cdf)).double()


def _memo(
    kind: str, k: torch.Tensor, n: int, delta: float, compute: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``compute`` on the distinct counts of ``k`` not computed before for (kind, n, delta), broadcast back.

    A calibration bounds the counts of hundreds of settings, most of them repeated across settings and calls.
    """
    values, inverse = torch.as_tensor(k).long().unique(return_inverse=True)
    keys = [(kind, v, n, delta) for v in values.tolist()]
    found = {key: _CACHE.get(key) for key in keys}
    missing = [key for key, value in found.items() if value is None]
    if missing:
        computed = dict(zip(missing, compute(torch.tensor([key[1] for key in missing])).tolist()))
        found.update(computed)
        if len(_CACHE) + len(computed) > _CACHE_SIZE:
            _CACHE.clear()
        _CACHE.update(computed)
    return torch.tensor([found[key] for key in keys], dtype=torch.float64)[inverse]


def clopper_pearson_upper(k: torch.Tensor, n: int, delta: float) -> torch.Tensor:
    """One-sided Clopper–Pearson upper bounds: with probability >= 1 - delta, the rate is <= the bound.

    The largest p with P(Binomial(n, p) <= k) >= delta (the 1 - delta quantile of Beta(k + 1, n - k)), by
    bisection on the exact tail, elementwise over the counts ``k``; for k = 0 it is 1 - delta ** (1 / n).
    """
    _check(n, delta)

    def compute(k: torch.Tensor) -> torch.Tensor:
        lo, hi = k.double() / n, torch.ones(k.shape, dtype=torch.float64)
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            above = binomial_cdf(k, n, mid) > delta  # mid is still a plausible rate: the bound is higher
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return torch.where(k >= n, 1.0, hi).double()

    return _memo("upper", k, n, delta, compute)


def clopper_pearson_lower(k: torch.Tensor, n: int, delta: float) -> torch.Tensor:
    """One-sided Clopper–Pearson lower bounds: with probability >= 1 - delta, the rate is >= the bound.

    The smallest p with P(Binomial(n, p) >= k) >= delta; 0 for k = 0.
    """
    _check(n, delta)

    def compute(k: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.zeros(k.shape, dtype=torch.float64), k.double() / n
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            below = 1 - binomial_cdf(k - 1, n, mid) < delta  # P(X >= k) too small: the bound is higher
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return torch.where(k <= 0, 0.0, lo).double()

    return _memo("lower", k, n, delta, compute)


def drop_upper_bound(lost: torch.Tensor, gained: torch.Tensor, n: int, delta: float) -> torch.Tensor:
    """Upper confidence bounds (at level ``delta``) on the drop rate P(lost) - P(gained), elementwise.

    ``lost``: counts of samples the deepest classifier gets right and the policy wrong; ``gained``: the reverse.
    Clopper–Pearson upper bound on the first at delta / 2 minus the lower bound on the second at delta / 2.
    """
    return clopper_pearson_upper(lost, n, delta / 2) - clopper_pearson_lower(gained, n, delta / 2)


def _kl_bernoulli(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h1(a, b) = KL(Bernoulli(a) || Bernoulli(b)), Hoeffding's exponent, with 0 log 0 = 0."""
    return torch.xlogy(a, a / b) + torch.xlogy(1 - a, (1 - a) / (1 - b))


def hoeffding_bentkus_pvalue(mean: torch.Tensor, n: int, alpha: torch.Tensor) -> torch.Tensor:
    """Hoeffding–Bentkus p-values of "the mean of a [0, 1] loss is >= alpha", from sample means over n.

    ``min(exp(-n h1(min(mean, alpha), alpha)), e * P(Binomial(n, alpha) <= ceil(n * mean)))`` (Bates et al. 2021),
    elementwise. ``alpha >= 1`` is a risk no [0, 1] loss exceeds (p = 0); ``alpha <= 0`` is never rejected (p = 1).
    """
    mean, alpha = torch.broadcast_tensors(torch.as_tensor(mean).double(), torch.as_tensor(alpha).double())
    a = alpha.clamp(1e-300, 1 - 1e-16)
    hoeffding = torch.exp(-n * _kl_bernoulli(torch.minimum(mean, a), a))
    bentkus = math.e * binomial_cdf(torch.ceil(n * mean).long(), n, a)
    p = torch.minimum(hoeffding, bentkus).clamp(max=1.0)
    return torch.where(alpha >= 1, 0.0, torch.where(alpha <= 0, 1.0, p)).double()


def hoeffding_bentkus_upper(mean: torch.Tensor, n: int, delta: float) -> torch.Tensor:
    """Upper confidence bounds on the mean of a [0, 1] loss: the smallest alpha whose HB p-value is <= delta.

    The p-value is the smaller of two terms falling in alpha, so the bound is the smaller of their roots: the
    Hoeffding one (KL(mean || alpha) = log(1 / delta) / n, by bisection) and the Bentkus one, the Clopper–Pearson
    upper bound of ceil(n * mean) events at level delta / e.
    """
    _check(n, delta)
    mean = torch.as_tensor(mean).double()
    lo, hi = mean.clone(), torch.ones(mean.shape, dtype=torch.float64)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        far = _kl_bernoulli(mean, mid.clamp(max=1 - 1e-16)) >= math.log(1 / delta) / n
        lo, hi = torch.where(far, lo, mid), torch.where(far, mid, hi)
    bentkus = clopper_pearson_upper(torch.ceil(n * mean).long(), n, delta / math.e)
    return torch.minimum(hi, bentkus)


def fixed_sequence(passes: Callable[[slice], torch.Tensor], length: int, chunk: int = _TEST_CHUNK) -> int:
    """Fixed-sequence testing: how many leading settings of an ordered path are certified.

    ``passes(slice)`` runs the level-delta tests of those settings (True: the null "risk above the target" is
    rejected). They run in path order, ``chunk`` settings at a time, stopping at the first null not rejected. The
    family-wise error rate is <= delta provided the order was fixed without the samples the tests use (Learn then
    Test, fixed-sequence procedure).
    """
    count = 0
    for start in range(0, length, chunk):
        for rejected in passes(slice(start, min(start + chunk, length))).tolist():
            if not rejected:
                return count
            count += 1
    return count


def samples_needed(rate: float, alpha: float, delta: float) -> float:
    """Roughly how many test samples certify a loss rate ``rate`` against a limit ``alpha`` at level ``delta``.

    From the Chernoff/Hoeffding exponent: n >= log(1 / delta) / KL(rate || alpha); infinite when rate >= alpha.
    For rate = 0 this is log(1 / delta) / -log(1 - alpha) ~ log(1 / delta) / alpha: the size at which even a
    sample without a single loss certifies alpha.
    """
    if rate >= alpha or alpha <= 0:
        return math.inf
    if alpha >= 1:
        return 1.0
    kl = float(_kl_bernoulli(torch.tensor(max(rate, 0.0)), torch.tensor(alpha, dtype=torch.float64)))
    return math.log(1 / delta) / kl
