"""``SelfDistillLoss``: the registered loss module that adds up self-distillation terms (maths in core)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from mmpretrain.registry import MODELS

from sd_plugin.core import SelfDistillConfig, SelfDistillOutput, self_distill_losses

__all__ = ["SelfDistillLoss"]

CEFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@MODELS.register_module()
class SelfDistillLoss(nn.Module):
    """Self-distillation loss terms as a dict, for mmengine's logger.

    Delegates to :func:`sd_plugin.core.self_distill_losses`; the label terms use
    the given cross-entropy functions (``SelfDistillClassifier`` passes each
    head's own loss module, so label smoothing and Mixup/CutMix soft targets
    behave as in the user's head). ``distill_scale`` multiplies the KD and hint
    weights (set by :class:`DistillWeightWarmupHook`).

    Args:
        config: A :class:`~sd_plugin.core.SelfDistillConfig`; or give its
            options (temperature, ce_weight, kd_weight, hint_weight,
            deepest_weight) as keywords.

    Example:
        >>> loss = dict(type='SelfDistillLoss', temperature=3.0, kd_weight=0.3,
        ...             hint_weight=0.03)
    """

    def __init__(self, config: Optional[SelfDistillConfig] = None, **options: Any) -> None:
        super().__init__()
        if config is not None and options:
            raise TypeError("give SelfDistillLoss either config or keyword options, not both.")
        self.config = config if config is not None else SelfDistillConfig(**options)
        self.distill_scale = 1.0

    def set_distill_scale(self, scale: float) -> None:
        """Multiply the KD and hint weights by ``scale`` in [0, 1] (warm-up)."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
            raise ValueError(f"distill scale must be a number in [0, 1], got {scale!r}.")
        self.distill_scale = float(scale)

    def forward(
        self,
        output: SelfDistillOutput,
        target: torch.Tensor,
        ce_fn: Optional[CEFn] = None,
        exit_ce_fns: Optional[Sequence[CEFn]] = None,
    ) -> Dict[str, torch.Tensor]:
        """``{'loss_ce': ..., 'exit1_loss_ce': ..., 'exit1_loss_kd': ..., 'exit1_loss_hint': ..., ...}``."""
        config = self.config
        if self.distill_scale != 1.0:
            config = dataclasses.replace(
                config,
                kd_weight=config.kd_weight * self.distill_scale,
                hint_weight=config.hint_weight * self.distill_scale,
            )
        return self_distill_losses(output, target, config, ce_fn=ce_fn, exit_ce_fns=exit_ce_fns)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"temperature={c.temperature}, ce_weight={c.ce_weight}, kd_weight={c.kd_weight}, "
            f"hint_weight={c.hint_weight}, deepest_weight={c.deepest_weight}, distill_scale={self.distill_scale}"
        )
