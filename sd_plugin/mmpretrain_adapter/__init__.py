"""MMPretrain / mmengine adapter: registered model, exit neck, loss, hooks, metrics, sampler, strategy.

Importing it registers, in sd_plugin's scoped registries (``type='sd_plugin.<Name>'``, see
:mod:`sd_plugin.registry`) and under the plain name in MMPretrain's:
``SelfDistillClassifier``, ``SelfDistillExitNeck`` and ``SelfDistillLoss`` (MODELS),
``DistillWeightWarmupHook``, ``ProgressiveSelfKDHook``, ``SaveStrippedCheckpointHook`` and ``RNGStateHook``
(HOOKS), ``ClassPairSampler`` (DATA_SAMPLERS), ``MultiExitAccuracy`` and ``MultiExitAveragePrecision``
(METRICS, the latter for multi-label heads), ``CPUAutocastOptimWrapper`` (OPTIM_WRAPPERS),
``ResumableFSDPStrategy`` (STRATEGIES), and the ``'sd_atomic_local'`` file backend. It also lets mmengine's
checkpoint loads (``resume``, ``load_from``) read mmengine's own objects under torch's ``weights_only=True``.
It is imported on first use of an ``sd_plugin.`` type, or by ``import sd_plugin`` once MMPretrain is imported.
"""

from .. import _amp, _mmengine_backend  # noqa: F401  (register CPUAutocastOptimWrapper, 'sd_atomic_local')
from .._safe_globals import install_scoped_mmengine_loader
from ..registry import expose_unscoped
from .class_pair_sampler import ClassPairSampler
from .classifier import EXIT_SCORES, SelfDistillClassifier
from .distill_loss import SelfDistillLoss
from .exit_neck import SelfDistillExitNeck
from .fsdp_strategy import ResumableFSDPStrategy
from .metric import MultiExitAccuracy
from .multi_label_metric import MultiExitAveragePrecision
from .pskd_hook import ProgressiveSelfKDHook
from .rng_state_hook import RNGStateHook
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
    "RNGStateHook",
    "ResumableFSDPStrategy",
]

install_scoped_mmengine_loader()
expose_unscoped()
