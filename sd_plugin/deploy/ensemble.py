"""The ensemble as a model: every exit and the deepest classifier run, their logits combined."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core.ensemble import ensemble_logits, equal_weights
from .early_exit import all_exit_logits, as_multi_exit, single_label
from .policy import ExitPolicy

__all__ = ["EnsembleModel"]


class EnsembleModel(nn.Module):
    """The ensemble's logits from images (the whole model runs: every exit and the deepest classifier).

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel` (``sd_plugin.wrap(...)``, ``SelfDistillClassifier``).
        weights: The calibrated ensemble: an :class:`ExitPolicy` from ``calibrate`` (its ``ensemble_weights``)
            or the weights themselves, one per classifier (``exit1`` ... the deepest); ``None``: BYOT's
            equal-weight ensemble.

    Returns (forward): (N, C) log-probabilities of the ensemble (its softmax is the ensemble's prediction).

    Example:
        >>> policy = calibrate(collect_exit_logits(model.eval(), calib_loader), max_drop=0.5)
        >>> ens = EnsembleModel(model, policy).eval()
        >>> pred = ens(images).argmax(dim=1)
    """

    def __init__(self, model: nn.Module, weights: Union[ExitPolicy, Sequence[float], None] = None) -> None:
        super().__init__()
        mx = single_label(as_multi_exit(model), "the ensemble model")
        if isinstance(weights, ExitPolicy):
            if weights.ensemble_weights is None:
                raise ValueError("the policy has no ensemble_weights: calibrate it with sd_plugin.deploy.calibrate.")
            weights = weights.ensemble_weights
        chosen: List[float] = equal_weights(mx.num_exits + 1) if weights is None else [float(w) for w in weights]
        ensemble_logits(torch.zeros(mx.num_exits + 1, 1, 1), chosen)  # validates count and values
        self.model = model
        self.weights = chosen

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return ensemble_logits(all_exit_logits(self.model, inputs), self.weights)

    def extra_repr(self) -> str:
        return f"weights={[round(w, 4) for w in self.weights]}"

    def get_extra_state(self) -> Any:
        return {"weights": list(self.weights)}

    def set_extra_state(self, state: Optional[Any]) -> None:
        if state:
            self.weights = [float(w) for w in state["weights"]]
