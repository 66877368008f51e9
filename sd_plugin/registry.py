"""sd_plugin's registries: ``type='sd_plugin.<Name>'`` works in any MMPretrain config, with no ``custom_imports``.

These are children of MMPretrain's registries (mmengine's, where MMPretrain has none) with the scope
``'sd_plugin'``, the mechanism OpenMMLab's downstream packages use. When a config names a scoped type,
mmengine's ``Registry.get`` imports ``sd_plugin.registry`` (this module), finds the child by its scope, and the
child imports the components lazily from its ``locations`` on first use::

    _base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']
    model = dict(type='sd_plugin.SelfDistillClassifier')
    val_evaluator = dict(type='sd_plugin.MultiExitAccuracy', topk=(1, 5))
    custom_hooks = [dict(type='sd_plugin.DistillWeightWarmupHook', warmup_epochs=5)]

Every component is also registered under its plain name in the parent registry (:func:`expose_unscoped`), so
the two-line form (``custom_imports=dict(imports=['sd_plugin'])`` and ``type='SelfDistillClassifier'``) keeps
working. Nothing here is imported for a config that names no ``sd_plugin.`` type and imports no sd_plugin.
"""

from __future__ import annotations

from typing import List

from mmengine.config.utils import MODULE2PACKAGE
from mmengine.registry import STRATEGIES as MMENGINE_STRATEGIES
from mmengine.registry import Registry
from mmpretrain import registry as mmpretrain_registry

__all__ = ["SCOPE", "MODELS", "HOOKS", "METRICS", "DATA_SAMPLERS", "OPTIM_WRAPPERS", "STRATEGIES", "expose_unscoped"]

SCOPE = "sd_plugin"
#: Importing this module registers every component (the MMPretrain adapter imports the rest).
COMPONENTS = ["sd_plugin.mmpretrain_adapter"]

MODELS = Registry("model", parent=mmpretrain_registry.MODELS, scope=SCOPE, locations=COMPONENTS)
HOOKS = Registry("hook", parent=mmpretrain_registry.HOOKS, scope=SCOPE, locations=COMPONENTS)
METRICS = Registry("metric", parent=mmpretrain_registry.METRICS, scope=SCOPE, locations=COMPONENTS)
DATA_SAMPLERS = Registry("data sampler", parent=mmpretrain_registry.DATA_SAMPLERS, scope=SCOPE, locations=COMPONENTS)
OPTIM_WRAPPERS = Registry("optim_wrapper", parent=mmpretrain_registry.OPTIM_WRAPPERS, scope=SCOPE, locations=COMPONENTS)
STRATEGIES = Registry("strategy", parent=MMENGINE_STRATEGIES, scope=SCOPE, locations=COMPONENTS)

_ALL: List[Registry] = [MODELS, HOOKS, METRICS, DATA_SAMPLERS, OPTIM_WRAPPERS, STRATEGIES]

# `_base_ = ['sd_plugin::<folder>/<config>.py']`: the distribution is named sd-plugin.
MODULE2PACKAGE.setdefault(SCOPE, "sd-plugin")


def expose_unscoped() -> None:
    """Register every sd_plugin component under its plain name in the parent registry too (the two-line form).

    Idempotent; a name the parent already holds for another object is left to that object.
    """
    for child in _ALL:
        parent = child.parent
        if parent is None:  # every registry above has one
            continue
        for name, obj in child.module_dict.items():
            if name not in parent.module_dict:
                parent.register_module(name=name, module=obj)


#: Set last: the module is complete (sd_plugin._frameworks checks it).
READY = True
