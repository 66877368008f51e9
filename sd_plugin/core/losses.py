"""Self-distillation loss maths in plain torch (no framework imports).

Each term is a function; :class:`SelfDistillLoss` is the thin module that adds
them up for every exit and returns a dict of named terms, e.g.
``{'loss_ce': ..., 'exit1_loss_ce': ..., 'exit1_loss_kd': ..., 'exit1_loss_hint': ...}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HINT_FORMS, SelfDistillConfig
from .methods import PastPredictions, class_pair_kd, pskd_alpha_at, pskd_term, tfkd_reg_term, zipf_term
from .naming import exit_name
from .outputs import SelfDistillOutput

__all__ = [
    "soft_cross_entropy",
    "kd_kl_div",
    "kd_binary_kl",
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


def _check_kd_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    _check_logits("student logits", student_logits)
    _check_logits("teacher logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


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
    _check_kd_pair(student_logits, teacher_logits, temperature)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def kd_binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-label KD: KL(Bernoulli(sigmoid(teacher / T)) || Bernoulli(sigmoid(student / T))) summed over classes.

    Every class is a yes/no decision of its own (the sigmoid per class of a
    multi-label head), so each class contributes the KL divergence of two
    two-outcome distributions; summed over classes and averaged over the batch
    like :func:`kd_kl_div`. Teacher detached; float32; not multiplied by T**2.
    """
    _check_kd_pair(student_logits, teacher_logits, temperature)
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    p_t = t.sigmoid()
    # log sigmoid(x) and log(1 - sigmoid(x)) = log sigmoid(-x), both stable for large |x|.
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(dim=1).mean()


def feature_hint(student_features: torch.Tensor, teacher_features: torch.Tensor, form: str = "mean") -> torch.Tensor:
    """L2 distance between (N, D) features reduced over the batch by ``form``; teacher detached; float32.

    With ``d_n = ||f_s(n) - f_t(n)||_2`` per sample: ``'rms'`` gives
    ``sqrt(mean_n d_n**2)`` (the L2 distance over the whole batch tensor divided
    by sqrt(N)), ``'squared'`` ``mean_n d_n**2`` and ``'mean'`` ``mean_n d_n``.
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
    if form not in HINT_FORMS:
        raise ValueError(f"hint form must be one of {HINT_FORMS}, got {form!r}.")
    diff = student_features.float().flatten(1) - teacher_features.detach().float().flatten(1)
    if form == "rms":
        return torch.linalg.vector_norm(diff) / math.sqrt(diff.shape[0])
    if form == "squared":
        return diff.pow(2).sum(dim=1).mean()
    return torch.linalg.vector_norm(diff, dim=1).mean()


def self_distill_losses(
    output: SelfDistillOutput,
    target: torch.Tensor,
    config: SelfDistillConfig,
    ce_fn: Optional[CEFn] = None,
    exit_ce_fns: Optional[Sequence[CEFn]] = None,
    past_probs: Optional[torch.Tensor] = None,
    progress: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """All loss terms, keyed ``loss_ce`` (deepest) and ``exit{k}_loss_{ce,kd,hint}`` (k = 1 is shallowest).

    The teacher-free methods add ``loss_pskd``, ``loss_cskd``, ``loss_tfkd`` and
    ``loss_zipf`` on the deepest classifier when their weights are non-zero
    (PS-KD and Tf-KD-reg also scale ``loss_ce`` by one minus their mixing
    weight; Zipf's LS adds to ``loss_ce`` at full weight). None of them touches
    the exits, whose terms stay BYOT's.

    A multi-label output (``output.multi_label``) distils with
    :func:`kd_binary_kl` (a sigmoid per class) instead of :func:`kd_kl_div`; the
    teacher-free methods, built on one softmax over the classes, refuse it.

    Args:
        output: Per-exit logits and features plus the deepest ones.
        target: Class indices (N,) or soft targets (N, C) (multi-label: (N, C) multi-hot).
        config: Weights and temperature.
        ce_fn: Label loss of the deepest classifier (default :func:`soft_cross_entropy`).
        exit_ce_fns: Label loss per exit (default ``ce_fn``), e.g. each exit head's own loss.
        past_probs: PS-KD: every sample's prediction from the previous epoch (N, C).
        progress: PS-KD: training progress ``epoch / max_epochs`` in [0, 1].
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
    if output.multi_label:
        methods = [
            n
            for n, w in (
                ("pskd_alpha", config.pskd_alpha),
                ("cskd_weight", config.cskd_weight),
                ("tfkd_weight", config.tfkd_weight),
                ("zipf_weight", config.zipf_weight),
            )
            if w > 0
        ]
        if methods:
            raise ValueError(
                f"{', '.join(methods)} > 0: PS-KD, CS-KD, Tf-KD-reg and Zipf's LS distil one softmax over the classes "
                "and do not apply to a multi-label classifier (a sigmoid per class); set them to 0 (BYOT's exit terms "
                "work)."
            )
    kd_fn = kd_binary_kl if output.multi_label else kd_kl_div
    losses: Dict[str, torch.Tensor] = {}
    label_scale = config.deepest_weight
    method_terms: Dict[str, torch.Tensor] = {}
    if config.pskd_alpha > 0:
        if past_probs is None or progress is None:
            raise ValueError(
                "PS-KD (pskd_alpha > 0) needs the past predictions and the training progress: use SelfDistillLoss "
                "with sample_index=... and set_progress(epoch / epochs) (MMPretrain: custom_hooks="
                "[dict(type='ProgressiveSelfKDHook')])."
            )
        alpha = pskd_alpha_at(config.pskd_alpha, progress)
        method_terms["loss_pskd"] = config.deepest_weight * alpha * pskd_term(output.logits, past_probs)
        label_scale *= 1.0 - alpha
    if config.tfkd_weight > 0:
        reg = tfkd_reg_term(output.logits, target, config.tfkd_correct_prob, config.tfkd_temperature)
        method_terms["loss_tfkd"] = config.deepest_weight * config.tfkd_weight * reg
        label_scale *= 1.0 - config.tfkd_weight
    if config.zipf_weight > 0:
        zipf = zipf_term(output.logits, target, config.zipf_power)
        method_terms["loss_zipf"] = config.deepest_weight * config.zipf_weight * zipf
    if config.cskd_weight > 0:
        hard = target if target.dim() == 1 else None
        method_terms["loss_cskd"] = config.cskd_weight * class_pair_kd(output.logits, config.cskd_temperature, hard)
    losses["loss_ce"] = label_scale * ce_fn(output.logits, target)
    losses.update(method_terms)
    teacher_logits = output.logits.detach()
    teacher_features = output.features.detach()
    for k, (logits, feats, exit_ce) in enumerate(zip(output.exit_logits, output.exit_features, exit_ce_fns)):
        name = exit_name(k, output.num_exits)
        losses[f"{name}_loss_ce"] = config.ce_weight * exit_ce(logits, target)
        losses[f"{name}_loss_kd"] = config.kd_weight * kd_fn(logits, teacher_logits, config.temperature)
        losses[f"{name}_loss_hint"] = config.hint_weight * feature_hint(feats, teacher_features, config.hint_form)
    return losses


class SelfDistillLoss(nn.Module):
    """The self-distillation criterion: BYOT's exit terms plus the teacher-free methods.

    ``SelfDistillLoss(**options)(output, target)`` returns the total loss (timm
    convention); the named terms of the last call are in ``.last_terms``
    (detached) for logging, and :meth:`terms` returns them as a dict (the
    MMPretrain ``SelfDistillLoss`` returns that dict). Options are those of
    :class:`SelfDistillConfig`.

    Warm-up: :meth:`set_distill_scale` multiplies the KD and hint weights by a
    scale in [0, 1] (MMPretrain: ``DistillWeightWarmupHook``; timm:
    ``sd-plugin train-timm --sd-warmup-epochs``). PS-KD: pass ``sample_index``
    (each sample's data-set index) and call :meth:`set_progress` every epoch;
    the past predictions are in this module's ``state_dict`` (extra state), so
    saving and loading the criterion with the checkpoint resumes them.

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
        **options: Any,
    ) -> None:
        super().__init__()
        if config is not None and options:
            raise TypeError("give SelfDistillLoss either config or keyword options, not both.")
        self.config = config if config is not None else SelfDistillConfig(**options)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)
        self.distill_scale = 1.0
        self.progress: Optional[float] = None
        self.past = PastPredictions()
        self.last_terms: Dict[str, torch.Tensor] = {}

    def set_distill_scale(self, scale: float) -> None:
        """Multiply the KD and hint weights by ``scale`` in [0, 1] (warm-up)."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
            raise ValueError(f"distill scale must be a number in [0, 1], got {scale!r}.")
        self.distill_scale = float(scale)

    def set_progress(self, progress: float) -> None:
        """Training progress ``epoch / max_epochs`` in [0, 1], for PS-KD's growing weight."""
        if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
            raise ValueError(f"training progress must be a number in [0, 1] (epoch / max_epochs), got {progress!r}.")
        self.progress = float(progress)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = self.label_smoothing if target.dim() == 1 else 0.0
        return soft_cross_entropy(logits, target, label_smoothing=smoothing)

    def _scaled_config(self) -> SelfDistillConfig:
        if self.distill_scale == 1.0:
            return self.config
        c = self.config
        return dataclasses.replace(
            c, kd_weight=c.kd_weight * self.distill_scale, hint_weight=c.hint_weight * self.distill_scale
        )

    def terms(
        self,
        output: SelfDistillOutput,
        target: torch.Tensor,
        ce_fn: Optional[CEFn] = None,
        exit_ce_fns: Optional[Sequence[CEFn]] = None,
        sample_index: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Every named term (see :func:`self_distill_losses`); updates PS-KD's past predictions in training."""
        past = None
        if self.config.pskd_alpha > 0:
            if sample_index is None:
                raise ValueError(
                    "PS-KD (pskd_alpha > 0) needs each sample's data-set index: call the loss with sample_index=... "
                    "(MMPretrain passes the data samples' sample_idx)."
                )
            if self.progress is None:
                raise ValueError(
                    "PS-KD (pskd_alpha > 0) needs the training progress: call set_progress(epoch / epochs) each "
                    "epoch (MMPretrain: custom_hooks=[dict(type='ProgressiveSelfKDHook')])."
                )
            logits = output.logits
            fallback = _target_probs(target, logits.shape[1])
            past = self.past.lookup(sample_index.to(torch.long), fallback).to(logits.device)
        terms = self_distill_losses(
            output, target, self._scaled_config(), ce_fn or self._ce, exit_ce_fns, past, self.progress
        )
        if past is not None and sample_index is not None and output.logits.requires_grad:
            self.past.update(sample_index.to(torch.long), output.logits.detach().float().softmax(dim=1))
        return terms

    def forward(
        self, output: SelfDistillOutput, target: torch.Tensor, sample_index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        terms = self.terms(output, target, sample_index=sample_index)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return torch.stack(list(terms.values())).sum()

    def method_state(self) -> Dict[str, Any]:
        """PS-KD's per-sample past predictions and the progress, for a checkpoint."""
        return {"pskd_past": self.past.state_dict(), "progress": self.progress}

    def load_method_state(self, state: Any) -> None:
        """Restore what :meth:`method_state` returned."""
        if not isinstance(state, dict) or "pskd_past" not in state:
            raise ValueError("not a SelfDistillLoss state (no 'pskd_past'): load the criterion's own state_dict.")
        self.past.load_state_dict(state["pskd_past"])
        self.progress = state.get("progress")

    def get_extra_state(self) -> Any:
        return self.method_state()

    def set_extra_state(self, state: Any) -> None:
        self.load_method_state(state)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"temperature={c.temperature}, ce_weight={c.ce_weight}, kd_weight={c.kd_weight}, "
            f"hint_weight={c.hint_weight}, hint_form={c.hint_form!r}, deepest_weight={c.deepest_weight}, "
            f"pskd_alpha={c.pskd_alpha}, cskd_weight={c.cskd_weight}, tfkd_weight={c.tfkd_weight}, "
            f"zipf_weight={c.zipf_weight}, "
            f"label_smoothing={self.label_smoothing}, distill_scale={self.distill_scale}"
        )


def _target_probs(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (N,) as one-hot rows; soft targets (N, C) as they are."""
    if target.dim() == 1:
        return F.one_hot(target.long(), num_classes).float()
    return target.float()
