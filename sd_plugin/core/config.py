"""Options of self-distillation, shared by the timm and MMPretrain adapters.

Defaults follow "Be Your Own Teacher" (Zhang et al., ICCV 2019, Sec. 3 and the
authors' CIFAR training code, github.com/ArchipLab-LinfengZhang/pytorch-self-distillation-final,
``train.py``): temperature 3, KD weight alpha = 0.3 with the label cross-entropy
weighted 1 - alpha = 0.7 on every shallow exit, and the deepest classifier
trained with plain cross-entropy. The feature hint's default (per-sample L2 mean,
weight 0.03) is ours and measured; ``hint_form='rms', hint_weight=0.34`` reproduces
BYOT's term at its batch size 128 (see ``hint_form``).
The teacher-free methods (PS-KD, CS-KD, Tf-KD-reg, Zipf's LS) are off by default;
each one composes with the exits or works alone (``exit_indices=[]``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Sequence, Tuple, Union

PredictExit = Union[str, int]

#: Reductions of the feature hint over the batch (see ``SelfDistillConfig.hint_form``).
HINT_FORMS: Tuple[str, ...] = ("rms", "squared", "mean")

__all__ = ["SelfDistillConfig", "PredictExit", "HINT_FORMS", "default_stage_exits", "default_block_exits"]


def _check_weight(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r}).")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}. Use 0 to switch the term off.")


@dataclass
class SelfDistillConfig:
    """Self-distillation options.

    Args:
        exit_indices: Where exits go. For stage-wise backbones, indices of the
            stages after which an exit is attached (0-based, the last stage is
            the deepest classifier and cannot take an exit). For plain token
            backbones (ViT, DeiT, ...), indices of transformer blocks. ``None``
            places one exit after every stage but the last, or, for plain token
            backbones, after the blocks at 1/4, 2/4 and 3/4 of the depth.
            Negative indices count from the end, as in Python. ``[]``: no exits,
            for a teacher-free method alone (PS-KD, CS-KD, Tf-KD-reg, Zipf's LS).
        temperature: Softmax temperature T of the KD term (BYOT: 3.0).
        ce_weight: Weight of the label cross-entropy on every shallow exit
            (BYOT: 1 - alpha = 0.7).
        kd_weight: Weight of KL(teacher_T || exit_T), the deepest exit's softened
            prediction being the detached teacher (BYOT: alpha = 0.3).
        hint_weight: Weight of the feature hint between an exit's pooled features
            and the deepest classifier's detached features (ours: 0.03 with
            ``hint_form='mean'``, the setting of the completed CPU benchmark in
            the README). ``hint_weight=0.34`` (0.03 x sqrt(128)) with
            ``hint_form='rms'`` equals BYOT's lambda = 0.03 times the L2 distance
            over the whole batch tensor at the authors' batch size 128 (~11x
            the default's strength there); in the README's 2-seed benchmark it
            scored 57.38 against the default's 58.04, so the default stays.
        hint_form: How the hint reduces the per-sample L2 distances ``d_n =
            ||f_s(n) - f_t(n)||_2`` over the batch, all batch-size independent:
            ``'mean'`` (default, ours) ``mean_n d_n``; ``'rms'``
            ``sqrt(mean_n d_n**2)``, i.e. the whole-batch L2 distance divided by
            sqrt(N); ``'squared'`` ``mean_n d_n**2``, the paper's squared L2
            (BYOT Sec. 3.2) per sample. BYOT's released CIFAR code has no hint
            term.
        deepest_weight: Weight of the deepest classifier's own loss (BYOT: 1.0).
        exit_hidden_ratio: Width of an exit's bottleneck relative to its output
            width (BYOT: 1/4 in its "branchBottleNeck").
        predict_exit: What prediction returns: ``'deepest'`` (the unmodified
            model, no extra cost), ``'ensemble'`` (BYOT Table 1's "ensemble",
            see below), or an int, the 1-based exit number
            (``len(exit_indices) + 1`` is the deepest). The ensemble is the
            softmax of the mean of all classifiers' logits, as BYOT's released
            code computes it (``sum(outputs) / len(outputs)``).
        pskd_alpha: PS-KD's final weight a_T of the past prediction in the
            deepest classifier's target (Kim et al., ICCV 2021, authors: 0.8;
            0 = off). Needs per-sample indices (MMPretrain: the data sample's
            ``sample_idx``; timm: ``SelfDistillLoss(..., sample_index=...)``) and
            the training progress (MMPretrain: ``custom_hooks=[dict(type=
            'ProgressiveSelfKDHook')]``; timm: ``loss.set_progress(epoch / epochs)``).
        cskd_weight: CS-KD's weight of the KL term between same-class pairs
            (Yun et al., CVPR 2020, authors: 1.0; 0 = off). Needs the class-pair
            sampler (MMPretrain: ``sampler=dict(type='ClassPairSampler')``;
            timm: ``sd-plugin train-timm --cs-kd``).
        cskd_temperature: CS-KD's temperature (authors: 4).
        tfkd_weight: Tf-KD-reg's weight alpha of the KL term to a hand-made
            teacher, the label loss being weighted 1 - alpha (Yuan et al., CVPR
            2020; ours: 0.1 when on, the authors tune it per data set; 0 = off).
        tfkd_temperature: Tf-KD-reg's temperature of the hand-made teacher
            (ours: 20, in the range of the authors' CIFAR settings).
        tfkd_correct_prob: Tf-KD-reg's probability of the true class in the
            hand-made teacher (authors' code: 0.99).
        zipf_weight: Zipf's LS's weight lambda of the KL term between Zipf
            soft labels over the non-target classes (ranked by the deepest
            classifier's own logits) and its non-target prediction, added to
            the label loss at full weight (Liang et al., ECCV 2022; authors:
            0.1 on CIFAR-100 and ImageNet, 1.0 on TinyImageNet and iNat21;
            0 = off). Deepest classifier only.
        zipf_power: Zipf's LS's exponent: the soft label of the non-target
            class of rank r is proportional to r ** -power (authors: 1.0).
    """

    exit_indices: Optional[Sequence[int]] = None
    temperature: float = 3.0
    ce_weight: float = 0.7
    kd_weight: float = 0.3
    hint_weight: float = 0.03
    hint_form: str = "mean"
    deepest_weight: float = 1.0
    exit_hidden_ratio: float = 0.25
    predict_exit: PredictExit = "deepest"
    pskd_alpha: float = 0.0
    cskd_weight: float = 0.0
    cskd_temperature: float = 4.0
    tfkd_weight: float = 0.0
    tfkd_temperature: float = 20.0
    tfkd_correct_prob: float = 0.99
    zipf_weight: float = 0.0
    zipf_power: float = 1.0

    def __post_init__(self) -> None:
        if self.exit_indices is not None:
            if isinstance(self.exit_indices, (str, bytes)) or not isinstance(self.exit_indices, Sequence):
                raise TypeError(f"exit_indices must be a list of ints or None, got {type(self.exit_indices).__name__}.")
            for i in self.exit_indices:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise TypeError(f"exit_indices must hold ints, got {i!r} in {list(self.exit_indices)}.")
            if len(set(self.exit_indices)) != len(self.exit_indices):
                raise ValueError(f"exit_indices has duplicates: {list(self.exit_indices)}.")
            self.exit_indices = tuple(self.exit_indices)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}.")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r} (BYOT uses 3.0).")
        for name in ("ce_weight", "kd_weight", "hint_weight", "deepest_weight", "cskd_weight"):
            _check_weight(name, getattr(self, name))
        if self.hint_form not in HINT_FORMS:
            raise ValueError(f"hint_form must be one of {HINT_FORMS}, got {self.hint_form!r}.")
        for name in ("pskd_alpha", "tfkd_weight"):
            _check_weight(name, getattr(self, name))
            if getattr(self, name) > 1:
                raise ValueError(f"{name} is a mixing weight in [0, 1], got {getattr(self, name)!r}.")
        for name in ("cskd_temperature", "tfkd_temperature"):
            _check_weight(name, getattr(self, name))
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be > 0, got 0.")
        _check_weight("tfkd_correct_prob", self.tfkd_correct_prob)
        if not 0 < self.tfkd_correct_prob < 1:
            raise ValueError(f"tfkd_correct_prob must be in (0, 1), got {self.tfkd_correct_prob!r} (authors: 0.99).")
        _check_weight("zipf_weight", self.zipf_weight)
        if isinstance(self.zipf_power, bool) or not isinstance(self.zipf_power, (int, float)):
            raise TypeError(f"zipf_power must be a number, got {type(self.zipf_power).__name__} ({self.zipf_power!r}).")
        if not math.isfinite(self.zipf_power) or self.zipf_power <= 0:
            raise ValueError(f"zipf_power must be a finite number > 0, got {self.zipf_power!r} (authors: 1.0).")
        if isinstance(self.exit_hidden_ratio, bool) or not isinstance(self.exit_hidden_ratio, (int, float)):
            raise TypeError(f"exit_hidden_ratio must be a number, got {type(self.exit_hidden_ratio).__name__}.")
        if not 0 < self.exit_hidden_ratio <= 4:
            raise ValueError(f"exit_hidden_ratio must be in (0, 4], got {self.exit_hidden_ratio!r}.")
        p = self.predict_exit
        if isinstance(p, bool) or not isinstance(p, (str, int)):
            raise TypeError(f"predict_exit must be 'deepest', 'ensemble' or an exit number, got {p!r}.")
        if isinstance(p, str) and p not in ("deepest", "ensemble"):
            raise ValueError(f"predict_exit must be 'deepest', 'ensemble' or an exit number (1-based), got {p!r}.")
        if isinstance(p, int) and p < 1:
            raise ValueError(f"predict_exit is a 1-based exit number, got {p}; use 1 for the shallowest exit.")

    def resolve_exit_indices(self, num_positions: int, default: Sequence[int]) -> Tuple[int, ...]:
        """Turn ``exit_indices`` into sorted non-negative indices below ``num_positions - 1``.

        Args:
            num_positions: Number of stages (or blocks) in the backbone; the last
                one feeds the deepest classifier.
            default: Placement used when ``exit_indices`` is None.
        """
        wanted = tuple(default) if self.exit_indices is None else tuple(self.exit_indices)
        out = []
        for i in wanted:
            j = i + num_positions if i < 0 else i
            if not 0 <= j < num_positions - 1:
                raise ValueError(
                    f"exit index {i} is out of range: this backbone has {num_positions} positions "
                    f"(valid exit indices are 0..{num_positions - 2}, or -{num_positions}..-2; the last one "
                    "is the deepest classifier)."
                )
            out.append(j)
        if len(set(out)) != len(out):
            raise ValueError(f"exit_indices {list(wanted)} name the same position twice.")
        return tuple(sorted(out))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.init)


def default_stage_exits(num_stages: int) -> Tuple[int, ...]:
    """One exit after every stage but the last (BYOT, SCAN)."""
    return tuple(range(num_stages - 1))


def default_block_exits(num_blocks: int) -> Tuple[int, ...]:
    """Exits after the blocks at 1/4, 2/4 and 3/4 of the depth (0-based block indices)."""
    if num_blocks < 2:
        return ()
    picks = sorted({max(0, round(num_blocks * k / 4) - 1) for k in (1, 2, 3)})
    return tuple(p for p in picks if p < num_blocks - 1)
