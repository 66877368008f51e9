"""Tf-KD-reg (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020).

A hand-made "teacher": probability ``a`` on the true class and ``(1 - a) / (K - 1)``
on every other class, softened by a temperature; the student's (unsoftened)
prediction is pulled towards it by a KL term. Form as in the authors' code
(``loss_kd_regularization``: ``KL(softmax(u / T) || softmax(z))``, correct-class
probability 0.99), with the KL averaged per sample (the authors' element mean
times their multiplier equals it when the multiplier is the class count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["tfkd_teacher", "tfkd_reg_term"]


def tfkd_teacher(target: torch.Tensor, num_classes: int, correct_prob: float, temperature: float) -> torch.Tensor:
    """The softened hand-made teacher distribution, (N, K).

    ``target`` is class indices (N,) or soft targets (N, K) (Mixup/CutMix): the
    un-softened teacher is ``a * y + (1 - a) / (K - 1) * (1 - y)`` for the target
    distribution ``y``, which is the authors' vector for a one-hot ``y``.
    """
    if num_classes < 2:
        raise ValueError(f"Tf-KD-reg needs at least 2 classes, got {num_classes}.")
    if not 0.0 < correct_prob < 1.0:
        raise ValueError(f"tfkd correct-class probability must be in (0, 1), got {correct_prob}.")
    if temperature <= 0:
        raise ValueError(f"tfkd temperature must be > 0, got {temperature}.")
    if target.dim() == 1:
        y = F.one_hot(target.long(), num_classes).float()
    elif target.dim() == 2 and target.shape[1] == num_classes:
        y = target.float()
    else:
        raise ValueError(f"target must be (N,) labels or (N, {num_classes}) soft targets, got {tuple(target.shape)}.")
    u = correct_prob * y + (1.0 - correct_prob) / (num_classes - 1) * (1.0 - y)
    return (u / temperature).softmax(dim=1)


def tfkd_reg_term(logits: torch.Tensor, target: torch.Tensor, correct_prob: float, temperature: float) -> torch.Tensor:
    """``KL(teacher || softmax(logits))`` summed over classes, batch mean; float32."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, num_classes), got shape {tuple(logits.shape)}.")
    teacher = tfkd_teacher(target, logits.shape[1], correct_prob, temperature)
    return F.kl_div(F.log_softmax(logits.float(), dim=1), teacher, reduction="batchmean")
