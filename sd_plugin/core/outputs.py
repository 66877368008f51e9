"""The structured training output that the self-distillation loss consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

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
    """

    logits: torch.Tensor
    features: torch.Tensor
    exit_logits: List[torch.Tensor]
    exit_features: List[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.exit_logits) != len(self.exit_features):
            raise ValueError(f"{len(self.exit_logits)} exit logits but {len(self.exit_features)} exit features.")

    @property
    def num_exits(self) -> int:
        return len(self.exit_logits)

    def all_logits(self) -> List[torch.Tensor]:
        """Logits of every exit then the deepest classifier (1-based exit k is index k - 1)."""
        return [*self.exit_logits, self.logits]

    def ensemble_probs(self) -> torch.Tensor:
        """Softmax of the mean logits of all exits and the deepest classifier.

        As BYOT's released code computes its ensemble (``sum(outputs) / len(outputs)``
        of the logits; github.com/ArchipLab-LinfengZhang/pytorch-self-distillation-final, train.py).
        """
        return torch.stack([lg.float() for lg in self.all_logits()]).mean(dim=0).softmax(dim=1)
