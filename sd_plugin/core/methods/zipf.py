"""Zipf's LS (Liang et al., "Efficient One Pass Self-distillation with Zipf's Label Smoothing", ECCV 2022).

The model's own prediction ranks the classes; the non-target classes get soft
labels that follow Zipf's law over those ranks, ``p(c) ∝ rank(c) ** -power``,
normalised over the non-target classes, and the model's distribution over the
non-target classes (a softmax of the non-target logits only) is pulled towards
them by ``KL(p || q)`` added to the label cross-entropy with a weight:
``loss = CE + weight * KL``. The ranking side carries no gradient.

As in the authors' code (github.com/megvii-research/zipfls,
``pytorch_zipfls/losses.py`` ``gen_pdf`` / ``kl_loss``, ``megengine_zipfls/loss.py``):

- ranks are taken over all classes, the target included, ties sharing the
  smallest rank (``scipy.stats.rankdata(method='min')``); the target's entry is
  then dropped and the rest renormalised, so when the target is not the top
  class the non-target ranks start at 1;
- defaults ``power = 1`` (``--power 1.0``); weight ``loss_lambda`` 0.1 on
  CIFAR-100 and ImageNet, 1.0 on TinyImageNet and iNat21 (their README and
  ``Makefile``);
- the KL is summed over the non-target classes and averaged over the batch; the
  term applies to the deepest (final) classifier only, plain cross-entropy
  staying at weight 1 (their ``train.py``: ``total = CE + loss_lambda * kd_loss``);
  their optional ``--mask`` (only correctly classified samples) is off by
  default and not provided here.

Variant. The authors' runs (``--dense``) rank the classes by *dense* votes: the
linear classifier is applied at every position of the last feature map and each
position's argmax counts as one vote. That needs the spatial map and a head that
is one linear layer applied per position; sd_plugin's training output
(:class:`~sd_plugin.core.outputs.SelfDistillOutput`) carries only the pooled
features and the logits of whatever head the model has (timm heads with
pre-logits or normalisation, MMPretrain heads, ViT tokens), so here the classes
are ranked by the deepest classifier's logits: the authors' non-dense ranking
(``gen_pdf(..., dense=False)``: ``rankdata(-logits)``). :func:`zipf_term` takes
any other per-class scores as ``rank_scores`` (e.g. per-position vote counts)
for a caller that has them.

Soft targets (Mixup/CutMix, (N, C)) use their largest class as the target; the
authors only train with class indices.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["zipf_ranks", "zipf_soft_labels", "zipf_term"]


def _check_scores(name: str, scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{name} must be (N, num_classes), got {shape}.")
    if scores.shape[1] < 2:
        raise ValueError(f"Zipf's LS needs at least 2 classes, got {scores.shape[1]}.")


def _target_classes(target: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """The target class per sample (N,): the labels, or the largest class of soft targets (N, C)."""
    if target.dim() == 1 and target.shape[0] == n and not target.dtype.is_floating_point:
        t = target.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes - 1}], got min {int(t.min())}, max {int(t.max())}.")
        return t
    if target.dim() == 2 and target.shape == (n, num_classes):
        return target.argmax(dim=1)
    raise ValueError(
        f"target must be ({n},) integer labels or ({n}, {num_classes}) soft targets, got {tuple(target.shape)} "
        f"{target.dtype}."
    )


def _check_power(power: float) -> None:
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"Zipf power must be > 0, got {power} (authors: 1.0).")


def zipf_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every class by ``scores`` (N, C), 1 for the largest; ties share the smallest rank; int64, no gradient.

    ``rank(c) = 1 + #{classes with a strictly larger score}``, i.e. ``scipy.stats.rankdata(-scores, method='min')``.
    """
    _check_scores("scores", scores)
    s = scores.detach()
    if s.dtype not in (torch.float32, torch.float64):
        s = s.double()  # exact for half, bfloat16 and integer scores such as vote counts
    neg = -s
    ascending = neg.sort(dim=1).values.contiguous()
    # Elements strictly below -s_c in ascending order = classes with a score strictly above s_c.
    return torch.searchsorted(ascending, neg.contiguous(), right=False) + 1


def zipf_soft_labels(scores: torch.Tensor, target: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Zipf soft labels (N, C), float32, no gradient: ``rank ** -power`` on the non-target classes, 0 on the target.

    Ranks come from :func:`zipf_ranks` over all classes (the target included); each row sums to 1 over the
    non-target classes. ``target`` is class indices (N,) or soft targets (N, C) (their largest class).
    """
    _check_scores("scores", scores)
    t = _target_classes(target, scores.shape[0], scores.shape[1]).to(scores.device)
    return _soft_labels(scores, t, power)


def _soft_labels(scores: torch.Tensor, t: torch.Tensor, power: float) -> torch.Tensor:
    _check_power(power)
    weights = zipf_ranks(scores).float().pow(-float(power))
    weights = weights.scatter(1, t.unsqueeze(1), 0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def zipf_term(
    logits: torch.Tensor, target: torch.Tensor, power: float = 1.0, rank_scores: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Zipf's LS term: ``KL(zipf || softmax(non-target logits))`` summed over the non-target classes, batch mean.

    Args:
        logits: (N, C) logits of the classifier being trained; float32 maths whatever their dtype.
        target: Class indices (N,) or soft targets (N, C) (their largest class is the target).
        power: Exponent of Zipf's law (authors: 1.0).
        rank_scores: (N, C) scores that rank the classes (default: ``logits``); always detached.
    """
    _check_scores("logits", logits)
    scores = logits if rank_scores is None else rank_scores
    if scores.shape != logits.shape:
        raise ValueError(f"rank_scores {tuple(scores.shape)} must have the logits' shape {tuple(logits.shape)}.")
    n, c = logits.shape
    t = _target_classes(target, n, c).to(logits.device)
    soft = _soft_labels(scores, t.to(scores.device), power).to(logits.device)
    keep = torch.ones_like(soft, dtype=torch.bool).scatter(1, t.unsqueeze(1), False)
    log_q = F.log_softmax(logits.float()[keep].view(n, c - 1), dim=1)
    return F.kl_div(log_q, soft[keep].view(n, c - 1), reduction="batchmean")
