"""The structured training output that the self-distillation loss consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .ensemble import ensemble_logits

__all__ = ["SelfDistillOutput"]


@dataclass
class SelfDistillOutput:
    """Per-exit logits and features, plus the deepest classifier's.

    Attributes:
        logits: Deepest classifier's logits (N, C), from the model's own head.
        features: Deepest classifier's input features (N, D).
        exit_logits: Logits of every exit, shallowest first, each (N, C).
        exit_features: Pooled features of every exit, each (N, D), the
            deepest features' shape (for the feature hint).
        multi_label: True when every class is a yes/no decision of its own
            (a sigmoid per class, as MMPretrain's ``MultiLabelClsHead``
            predicts), False for one softmax over the classes.
    """

    logits: torch.Tensor
    features: torch.Tensor
    exit_logits: List[torch.Tensor]
    exit_features: List[torch.Tensor]
    multi_label: bool = False

    def __post_init__(self) -> None:
        if len(self.exit_logits) != len(self.exit_features):
            raise ValueError(f"{len(self.exit_logits)} exit logits but {len(self.exit_features)} exit features.")

    @property
    def num_exits(self) -> int:
        return len(self.exit_logits)

    def all_logits(self) -> List[torch.Tensor]:
        """Logits of every exit then the deepest classifier (1-based exit k is index k - 1)."""
        return [*self.exit_logits, self.logits]

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``logits`` (N, C): softmax, or a sigmoid per class when ``multi_label``."""
        return logits.float().sigmoid() if self.multi_label else logits.float().softmax(dim=1)

    def ensemble_probs(self, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Probabilities (see :meth:`probs`) of the ensemble of all exits and the deepest classifier.

        Equal weights by default: the mean of the logits, as BYOT's released code computes its ensemble
        (``sum(outputs) / len(outputs)``; see :mod:`sd_plugin.core.ensemble`); ``weights`` from
        :func:`~sd_plugin.core.ensemble.fit_ensemble_weights` for the calibrated ensemble.
        """
        return self.probs(ensemble_logits(self.all_logits(), weights, multi_label=True))

    def ensemble_logits(self, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Float32 logits whose probabilities (:meth:`probs`) are :meth:`ensemble_probs`: the log of the ensemble's
        softmax (clamped, no -inf), or for a multi-label output the weighted logits themselves."""
        return ensemble_logits(self.all_logits(), weights, multi_label=self.multi_label)
