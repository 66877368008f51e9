"""``MultiExitAveragePrecision``: mAP of every exit, the deepest classifier and their ensemble (multi-label heads)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric
from mmpretrain.evaluation.metrics import AveragePrecision
from mmpretrain.structures import label_to_onehot

from ..core.naming import exit_names
from ..registry import METRICS
from ._early_exit_infer import request_exit_scores
from .metric import exit_scores_of

__all__ = ["MultiExitAveragePrecision"]


@METRICS.register_module()
class MultiExitAveragePrecision(BaseMetric):
    """Mean average precision of each exit of a multi-label :class:`SelfDistillClassifier`.

    The multi-label counterpart of :class:`MultiExitAccuracy`, for models with a
    ``MultiLabelClsHead`` (``MultiLabelLinearClsHead``, ``CSRAClsHead``): reads
    the per-class sigmoid scores of every exit (``exit_scores``) and computes
    MMPretrain's ``AveragePrecision`` (macro mAP, percent) for ``exit{k}``,
    ``deepest`` and ``ensemble`` (the sigmoid of the mean logits of all),
    named ``exit{k}_mAP``, ``deepest_mAP`` and ``ensemble_mAP`` under the prefix.
    ``deepest_mAP`` equals MMPretrain's ``AveragePrecision`` on the same predictions.

    Args:
        collect_device: Device to gather results on in distributed runs.
        prefix: Prefix of the metric names.

    Example:
        >>> val_evaluator = [dict(type='AveragePrecision'), dict(type='MultiExitAveragePrecision')]
    """

    default_prefix: Optional[str] = "multi-exit"
    #: Reads every exit's scores: while it lives, ``SelfDistillClassifier`` computes them in val/test steps.
    requires_exit_scores = True

    def __init__(self, collect_device: str = "cpu", prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        request_exit_scores(self)

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Keep every sample's per-exit scores and its multi-hot target."""
        for sample in data_samples:
            scores = exit_scores_of(sample, type(self).__name__)
            if "gt_score" in sample:
                target = sample["gt_score"].float()
            else:
                target = label_to_onehot(sample["gt_label"], scores.shape[1]).float()
            self.results.append({"scores": scores.float().cpu(), "target": target.cpu()})

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        """mAP (percent) per exit, deepest and ensemble."""
        scores = torch.stack([r["scores"] for r in results])  # (N, E + 1, C) sigmoid scores
        target = torch.stack([r["target"] for r in results])
        if target.shape != (scores.shape[0], scores.shape[2]):
            raise ValueError(f"targets {tuple(target.shape)} do not fit scores {tuple(scores.shape)}.")
        n_outputs = scores.shape[1]
        names = exit_names(n_outputs - 1)
        tiny = torch.finfo(torch.float32).tiny
        logits = scores.clamp_min(tiny).log() - (1 - scores).clamp_min(tiny).log()  # the sigmoid's inverse
        ensemble = logits.mean(dim=1).sigmoid()
        per_output = [scores[:, i] for i in range(n_outputs)] + [ensemble]
        return {
            f"{name}_mAP": float(AveragePrecision.calculate(pred, target))
            for name, pred in zip([*names, "ensemble"], per_output)
        }
