"""MMPretrain / mmengine adapter: registered model, exit neck, loss, hook and metric.

Importing it (``import sd_plugin`` does) registers into MMPretrain's registries:
``SelfDistillClassifier``, ``SelfDistillExitNeck`` and ``SelfDistillLoss`` (MODELS),
``DistillWeightWarmupHook``, ``ProgressiveSelfKDHook`` and ``SaveStrippedCheckpointHook``
(HOOKS), ``ClassPairSampler`` (DATA_SAMPLERS), ``MultiExitAccuracy`` and ``MultiExitAveragePrecision``
(METRICS, the latter for multi-label heads).
"""

from .class_pair_sampler import ClassPairSampler
from .classifier import EXIT_SCORES, SelfDistillClassifier
from .distill_loss import SelfDistillLoss
from .exit_neck import SelfDistillExitNeck
from .metric import MultiExitAccuracy
from .multi_label_metric import MultiExitAveragePrecision
from .pskd_hook import ProgressiveSelfKDHook
from .save_stripped_checkpoint_hook import SaveStrippedCheckpointHook
from .warmup_hook import DistillWeightWarmupHook

__all__ = [
    "EXIT_SCORES",
    "SelfDistillClassifier",
    "SelfDistillExitNeck",
    "SelfDistillLoss",
    "MultiExitAccuracy",
    "MultiExitAveragePrecision",
    "DistillWeightWarmupHook",
    "ProgressiveSelfKDHook",
    "ClassPairSampler",
    "SaveStrippedCheckpointHook",
]
