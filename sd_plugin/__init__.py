"""sd_plugin: teacher-free self-distillation for timm and MMPretrain classifiers.

Importing sd_plugin registers its MMPretrain components (when MMPretrain is
installed) and makes mmengine checkpoints loadable under torch's
``weights_only=True`` default. The timm API (:func:`wrap`, :func:`unwrap`) is
imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .core import SelfDistillConfig, SelfDistillLoss, SelfDistillOutput
from .version import __version__

__all__ = [
    "__version__",
    "SelfDistillConfig",
    "SelfDistillLoss",
    "SelfDistillOutput",
    "SelfDistillModel",
    "wrap",
    "unwrap",
]

_LAZY = {
    "wrap": "sd_plugin.timm_adapter",
    "unwrap": "sd_plugin.timm_adapter",
    "SelfDistillModel": "sd_plugin.timm_adapter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd_plugin' has no attribute {name!r}")


def _setup_frameworks() -> None:
    if importlib.util.find_spec("mmengine") is not None:
        from mmengine.config.utils import MODULE2PACKAGE

        from ._safe_globals import install_scoped_mmengine_loader

        install_scoped_mmengine_loader()
        importlib.import_module("sd_plugin._mmengine_backend")  # registers the 'sd_atomic_local' file backend
        # Lets configs say `_base_ = ['sd_plugin::<folder>/<config>.py']` once sd_plugin is imported.
        MODULE2PACKAGE.setdefault("sd_plugin", "sd-plugin")
    if importlib.util.find_spec("mmpretrain") is not None:
        importlib.import_module("sd_plugin.mmpretrain_adapter")
        importlib.import_module("sd_plugin._amp")  # registers CPUAutocastOptimWrapper
        importlib.import_module("sd_plugin.mmpretrain_adapter.rng_state_hook")  # registers RNGStateHook


_setup_frameworks()
