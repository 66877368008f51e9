"""``MultiExitAccuracy``: top-k accuracy of every exit, the deepest classifier and their ensemble."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from mmengine.evaluator import BaseMetric
from mmpretrain.evaluation.metrics import Accuracy

from ..core.ensemble import ensemble_logits
from ..core.naming import exit_names
from ..registry import METRICS
from ._early_exit_infer import request_exit_scores
from .classifier import EXIT_SCORES

__all__ = ["MultiExitAccuracy", "exit_scores_of"]


def exit_scores_of(sample: Any, metric: str) -> torch.Tensor:
    """The (num_exits + 1, num_classes) ``exit_scores`` of one prediction, for the metric named ``metric``."""
    if EXIT_SCORES not in sample:
        raise KeyError(
            f"{metric} needs '{EXIT_SCORES}' in the predictions: use it with "
            "model=dict(type='SelfDistillClassifier') and eval_exits=True (the default)."
        )
    scores = sample[EXIT_SCORES]
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"'{EXIT_SCORES}' must be (num_exits + 1, num_classes), got {shape}.")
    return scores


@METRICS.register_module()
class MultiExitAccuracy(BaseMetric):
    """Accuracy of each exit of a :class:`SelfDistillClassifier`, its deepest classifier and the ensemble.

    Reads the ``exit_scores`` that ``SelfDistillClassifier`` attaches to every
    DataSample during validation and testing. Metric names are
    ``exit{k}_top{n}`` (k = 1 is the shallowest exit), ``deepest_top{n}`` and
    ``ensemble_top{n}`` (softmax of the mean logits of all, BYOT's "ensemble"), in percent,
    under the prefix (e.g. ``multi-exit/deepest_top1``, usable in
    ``CheckpointHook(save_best=...)``).

    With a calibrated ensemble (weights fitted on held-out data, saved in an early-exit policy file by
    ``calibrate``) it also reports ``calibrated_ensemble_top{n}``; ``ensemble_top{n}`` stays BYOT's equal-weight
    ensemble.

    Args:
        topk: The k of top-k accuracy, an int or a sequence of ints.
        collect_device: Device to gather results on in distributed runs.
        prefix: Prefix of the metric names.
        policy: Path of a policy JSON whose ``ensemble_weights`` give the calibrated ensemble.
        ensemble_weights: The calibrated ensemble's weights themselves (one per exit, then the deepest).

    Example:
        >>> val_evaluator = dict(type='sd_plugin.MultiExitAccuracy', topk=(1, 5))
        >>> test_evaluator = dict(type='sd_plugin.MultiExitAccuracy', policy='work_dirs/policy.json')
    """

    default_prefix: Optional[str] = "multi-exit"
    #: Reads every exit's scores: while it lives, ``SelfDistillClassifier`` computes them in val/test steps.
    requires_exit_scores = True

    def __init__(
        self,
        topk: Union[int, Sequence[int]] = (1,),
        collect_device: str = "cpu",
        prefix: Optional[str] = None,
        policy: Optional[str] = None,
        ensemble_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if policy is not None and ensemble_weights is not None:
            raise ValueError("give the calibrated ensemble once: policy='file.json' or ensemble_weights=[...].")
        if policy is not None:
            from ..deploy.policy import ExitPolicy

            ensemble_weights = ExitPolicy.load(policy).ensemble_weights
            if ensemble_weights is None:
                raise ValueError(f"{policy} has no ensemble_weights: write it with sd_plugin.deploy.calibrate(...).")
        self.ensemble_weights = None if ensemble_weights is None else [float(w) for w in ensemble_weights]
        ks = (topk,) if isinstance(topk, int) else tuple(topk)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"topk must be a positive int or a sequence of them, got {topk!r}.")
        self.topk = ks
        request_exit_scores(self)

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Keep every sample's per-exit scores and label."""
        for sample in data_samples:
            scores = exit_scores_of(sample, type(self).__name__)
            if not torch.allclose(scores.float().sum(dim=1), torch.ones(()), atol=1e-3):
                raise ValueError(
                    f"'{EXIT_SCORES}' rows do not sum to 1: these are a multi-label head's per-class sigmoid scores, "
                    "for which top-k accuracy is not defined. Use dict(type='MultiExitAveragePrecision') instead."
                )
            self.results.append({"scores": scores.cpu(), "label": sample["gt_label"].cpu().reshape(-1)[:1]})

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        """Top-k accuracy (percent) per exit, deepest and ensemble."""
        scores = torch.stack([r["scores"] for r in results])  # (N, E + 1, C)
        target = torch.cat([r["label"] for r in results])
        n_outputs = scores.shape[1]
        names = exit_names(n_outputs - 1)
        # The library's ensemble of the log-probabilities: each differs from its logits by a per-sample constant,
        # so its softmax is the ensemble of the logits.
        log_scores = scores.float().clamp_min(torch.finfo(torch.float32).tiny).log().transpose(0, 1)
        # probabilities: mmpretrain's Accuracy counts scores below its threshold (0) as no prediction
        per_output = [scores[:, i] for i in range(n_outputs)] + [ensemble_logits(log_scores).exp()]
        names = [*names, "ensemble"]
        if self.ensemble_weights is not None:
            per_output.append(ensemble_logits(log_scores, self.ensemble_weights).exp())
            names.append("calibrated_ensemble")
        metrics: Dict[str, float] = {}
        for name, pred in zip(names, per_output):
            accs = Accuracy.calculate(pred, target, topk=self.topk)
            for k, acc in zip(self.topk, accs):
                metrics[f"{name}_top{k}"] = float(acc[0] if isinstance(acc, (list, tuple)) else acc)
        return metrics
