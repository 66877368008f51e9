"""Registering sd_plugin's MMPretrain components when, and only when, MMPretrain is in use.

``import sd_plugin`` must stay light (torch and sd_plugin's core: no mmengine, MMPretrain or mmcv module, no
warning), yet the two-line MMPretrain route (``custom_imports=dict(imports=['sd_plugin'])``, then
``type='SelfDistillClassifier'``) must find the components by their plain names. So importing sd_plugin only
arranges for the MMPretrain adapter to be imported right after ``mmpretrain`` itself has been imported (at once
if it already is). The one-line route (``type='sd_plugin.SelfDistillClassifier'``) needs none of this: mmengine
imports :mod:`sd_plugin.registry` by the scope.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

__all__ = ["ADAPTER", "after_import", "register_when_mmpretrain_loads"]

FRAMEWORK = "mmpretrain"
ADAPTER = "sd_plugin.mmpretrain_adapter"
REGISTRY = "sd_plugin.registry"


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: lets the usual finders find ``name``, then runs ``callback`` once it has executed."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None
    ) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module
        callback = self.callback

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            callback()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's loader only
        return spec


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the top-level module ``name`` has been imported (now, if it already is)."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _import_adapter() -> None:
    if ADAPTER in sys.modules:  # being imported (it imported mmpretrain) or done: it registers itself
        return
    registry = sys.modules.get(REGISTRY)
    if registry is not None and not getattr(registry, "READY", False):
        return  # sd_plugin.registry is importing mmpretrain: its children import the adapter on first use
    try:
        importlib.import_module(ADAPTER)
    except Exception as err:  # never break the user's own `import mmpretrain`
        warnings.warn(
            f"sd_plugin could not register its MMPretrain components ({type(err).__name__}: {err}); "
            f"`import {ADAPTER}` shows the full error. Check the versions in sd_plugin's README.",
            RuntimeWarning,
            stacklevel=2,
        )


def register_when_mmpretrain_loads() -> None:
    """Import the MMPretrain adapter (registering every component) as soon as MMPretrain is imported."""
    after_import(FRAMEWORK, _import_adapter)
