"""MMPretrain / mmengine adapter: registered model, exit neck, loss, hook and metric.

Importing it (``import sd_plugin`` does) registers into MMPretrain's registries:
``SelfDistillClassifier``, ``SelfDistillExitNeck`` and ``SelfDistillLoss`` (MODELS),
``DistillWeightWarmupHook`` and ``SaveStrippedCheckpointHook`` (HOOKS) and
``MultiExitAccuracy`` (METRICS).
"""

from .classifier import EXIT_SCORES, SelfDistillClassifier
from .distill_loss import SelfDistillLoss
from .exit_neck import SelfDistillExitNeck
from .metric import MultiExitAccuracy
from .save_stripped_checkpoint_hook import SaveStrippedCheckpointHook
from .warmup_hook import DistillWeightWarmupHook

__all__ = [
    "EXIT_SCORES",
    "SelfDistillClassifier",
    "SelfDistillExitNeck",
    "SelfDistillLoss",
    "MultiExitAccuracy",
    "DistillWeightWarmupHook",
    "SaveStrippedCheckpointHook",
]
