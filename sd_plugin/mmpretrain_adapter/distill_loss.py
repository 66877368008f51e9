"""``SelfDistillLoss`` for MMPretrain: the core criterion, returning its named terms as a dict for mmengine's logger."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from sd_plugin.core import SelfDistillLoss as _CoreSelfDistillLoss
from sd_plugin.core import SelfDistillOutput

from ..registry import MODELS

__all__ = ["SelfDistillLoss"]

CEFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@MODELS.register_module()
class SelfDistillLoss(_CoreSelfDistillLoss):
    """:class:`sd_plugin.core.SelfDistillLoss` with MMPretrain's return type: a dict of named loss terms.

    The label terms use the given cross-entropy functions
    (``SelfDistillClassifier`` passes each head's own loss module, so label
    smoothing and Mixup/CutMix soft targets behave as in the user's head).
    ``distill_scale`` multiplies the KD and hint weights (set by
    :class:`DistillWeightWarmupHook`); the training progress for PS-KD is set
    by :class:`ProgressiveSelfKDHook`, which also saves the past predictions in
    the checkpoint (they are kept out of the model's ``state_dict``, so a
    stripped or plain checkpoint never carries them).

    Args:
        config: A :class:`~sd_plugin.core.SelfDistillConfig`; or give its
            options (temperature, ce_weight, kd_weight, hint_weight, ...) as keywords.
        label_smoothing: Only for the default cross-entropy, which ``SelfDistillClassifier``
            never uses: it passes each head's own loss, so set label smoothing in the head
            (``loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1)``); it reaches every exit.

    Example:
        >>> loss = dict(type='SelfDistillLoss', temperature=3.0, kd_weight=0.3)
    """

    # Not part of the model's state_dict (see the class docstring).
    get_extra_state = nn.Module.get_extra_state  # type: ignore[assignment]
    set_extra_state = nn.Module.set_extra_state  # type: ignore[assignment]

    def forward(  # type: ignore[override]
        self,
        output: SelfDistillOutput,
        target: torch.Tensor,
        ce_fn: Optional[CEFn] = None,
        exit_ce_fns: Optional[Sequence[CEFn]] = None,
        sample_index: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """``{'loss_ce': ..., 'exit1_loss_ce': ..., 'exit1_loss_kd': ..., 'exit1_loss_hint': ..., ...}``."""
        terms = self.terms(output, target, ce_fn=ce_fn, exit_ce_fns=exit_ce_fns, sample_index=sample_index)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return terms
