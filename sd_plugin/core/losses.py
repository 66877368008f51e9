"""Self-distillation loss maths in plain torch (no framework imports).

Each term is a function; :class:`SelfDistillLoss` is the thin module that adds
them up for every exit and returns a dict of named terms, e.g.
``{'loss_ce': ..., 'exit1_loss_ce': ..., 'exit1_loss_kd': ..., 'exit1_loss_hint': ...}``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SelfDistillConfig
from .outputs import SelfDistillOutput

__all__ = [
    "soft_cross_entropy",
    "kd_kl_div",
    "feature_hint",
    "self_distill_losses",
    "SelfDistillLoss",
]

CEFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(logits).__name__}.")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be (N, num_classes) logits, got shape {tuple(logits.shape)}.")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for class indices ``(N,)`` or soft targets ``(N, C)`` (Mixup/CutMix), batch mean.

    Computed in float32 whatever the input dtype (autocast safe).
    """
    _check_logits("logits", logits)
    n, c = logits.shape
    logits = logits.float()
    if target.dim() == 1:
        if target.shape[0] != n:
            raise ValueError(f"target has {target.shape[0]} labels for {n} samples.")
        if target.dtype.is_floating_point:
            raise TypeError("class-index targets must be an integer tensor; soft targets must be (N, num_classes).")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            raise ValueError(
                f"labels must lie in [0, {c - 1}] for {c} classes, got min {int(target.min())} and "
                f"max {int(target.max())}: check num_classes of the model against the data set."
            )
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if target.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}.")
    target = target.float()
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / c
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), summed over classes, batch mean.

    The teacher side is detached here, so no gradient can flow into it. Not
    multiplied by T**2, as in BYOT's training code. Computed in float32.
    """
    _check_logits("student logits", student_logits)
    _check_logits("teacher logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def feature_hint(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 distance ``||f_s - f_t||_2`` between (N, D) features, batch mean; teacher detached.

    Shapes must match exactly: a (N, D) vs (N, D, 1, 1) pair would otherwise
    broadcast into an N x N comparison of every sample with every other.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature hint: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same shape (no broadcasting)."
        )
    if student_features.dim() < 2:
        raise ValueError(f"features must be (N, D, ...), got shape {tuple(student_features.shape)}.")
    diff = student_features.float().flatten(1) - teacher_features.detach().float().flatten(1)
    return torch.linalg.vector_norm(diff, dim=1).mean()


def self_distill_losses(
    output: SelfDistillOutput,
    target: torch.Tensor,
    config: SelfDistillConfig,
    ce_fn: Optional[CEFn] = None,
    exit_ce_fns: Optional[Sequence[CEFn]] = None,
) -> Dict[str, torch.Tensor]:
    """All loss terms, keyed ``loss_ce`` (deepest) and ``exit{k}_loss_{ce,kd,hint}`` (k = 1 is shallowest).

    Args:
        output: Per-exit logits and features plus the deepest ones.
        target: Class indices (N,) or soft targets (N, C).
        config: Weights and temperature.
        ce_fn: Label loss of the deepest classifier (default :func:`soft_cross_entropy`).
        exit_ce_fns: Label loss per exit (default ``ce_fn``), e.g. each exit head's own loss.
    """
    if not isinstance(output, SelfDistillOutput):
        raise TypeError(
            f"the self-distillation loss needs the wrapped model's training output (SelfDistillOutput), got "
            f"{type(output).__name__}. Call the loss on sd_model(x) with sd_model in train mode; in eval mode "
            "the wrapped model returns plain logits."
        )
    ce_fn = ce_fn or soft_cross_entropy
    if exit_ce_fns is None:
        exit_ce_fns = [ce_fn] * output.num_exits
    if len(exit_ce_fns) != output.num_exits:
        raise ValueError(f"got {len(exit_ce_fns)} exit loss functions for {output.num_exits} exits.")
    losses: Dict[str, torch.Tensor] = {}
    losses["loss_ce"] = config.deepest_weight * ce_fn(output.logits, target)
    teacher_logits = output.logits.detach()
    teacher_features = output.features.detach()
    for k, (logits, feats, exit_ce) in enumerate(zip(output.exit_logits, output.exit_features, exit_ce_fns), 1):
        losses[f"exit{k}_loss_ce"] = config.ce_weight * exit_ce(logits, target)
        losses[f"exit{k}_loss_kd"] = config.kd_weight * kd_kl_div(logits, teacher_logits, config.temperature)
        losses[f"exit{k}_loss_hint"] = config.hint_weight * feature_hint(feats, teacher_features)
    return losses


class SelfDistillLoss(nn.Module):
    """Self-distillation criterion for a wrapped model's training output.

    ``SelfDistillLoss(**options)(output, target)`` returns the total loss; the
    named terms of the last call are in ``.last_terms`` (detached) for logging.
    Options are those of :class:`SelfDistillConfig` (temperature and weights).

    Args:
        config: A :class:`SelfDistillConfig`; or give its options as keywords.
        label_smoothing: Label smoothing of the cross-entropy terms (timm's
            ``--smoothing``); ignored for soft (Mixup/CutMix) targets, which
            already carry it.
    """

    def __init__(
        self,
        config: Optional[SelfDistillConfig] = None,
        label_smoothing: float = 0.0,
        **options: object,
    ) -> None:
        super().__init__()
        if config is not None and options:
            raise TypeError("give either config or keyword options, not both.")
        self.config = config if config is not None else SelfDistillConfig(**options)  # type: ignore[arg-type]
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing
        self.last_terms: Dict[str, torch.Tensor] = {}

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = self.label_smoothing if target.dim() == 1 else 0.0
        return soft_cross_entropy(logits, target, label_smoothing=smoothing)

    def forward(self, output: SelfDistillOutput, target: torch.Tensor) -> torch.Tensor:
        terms = self_distill_losses(output, target, self.config, ce_fn=self._ce)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return torch.stack(list(terms.values())).sum()
