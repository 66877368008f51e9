"""sd_plugin: teacher-free self-distillation for timm and MMPretrain classifiers.

Importing sd_plugin imports torch and sd_plugin's core only. The timm API (:func:`wrap`, :func:`unwrap`,
:func:`load_exits`) is imported on first use; the MMPretrain components are registered once MMPretrain itself is
imported (the ``custom_imports=dict(imports=['sd_plugin'])`` route), and a config can name them with no import at
all as ``type='sd_plugin.SelfDistillClassifier'`` (see :mod:`sd_plugin.registry`).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._frameworks import register_when_mmpretrain_loads
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
    "load_exits",
]

_LAZY = {
    "wrap": "sd_plugin.timm_adapter",
    "unwrap": "sd_plugin.timm_adapter",
    "load_exits": "sd_plugin.timm_adapter",
    "SelfDistillModel": "sd_plugin.timm_adapter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd_plugin' has no attribute {name!r}")


register_when_mmpretrain_loads()
