"""Framework-agnostic core: options, exits, feature taps and loss maths in plain torch."""

from .config import SelfDistillConfig, default_block_exits, default_stage_exits
from .ensemble import EnsembleFit, ensemble_logits, fit_ensemble_weights
from .exits import ConvExit, TokenExit, VectorExit, build_exit
from .losses import SelfDistillLoss, feature_hint, kd_binary_kl, kd_kl_div, self_distill_losses, soft_cross_entropy
from .outputs import SelfDistillOutput
from .protocol import MultiExitModel
from .taps import ExitPoint, FeatureTaps, StopForward, get_submodule, select_feature

__all__ = [
    "SelfDistillConfig",
    "default_block_exits",
    "default_stage_exits",
    "ConvExit",
    "TokenExit",
    "VectorExit",
    "build_exit",
    "SelfDistillLoss",
    "feature_hint",
    "kd_kl_div",
    "kd_binary_kl",
    "self_distill_losses",
    "soft_cross_entropy",
    "SelfDistillOutput",
    "ensemble_logits",
    "fit_ensemble_weights",
    "EnsembleFit",
    "MultiExitModel",
    "ExitPoint",
    "FeatureTaps",
    "StopForward",
    "get_submodule",
    "select_feature",
]
