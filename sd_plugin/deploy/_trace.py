"""Which submodules a forward pass runs, and dropping the ones it does not."""

from __future__ import annotations

from typing import Any, Callable, List, Set

import torch.nn as nn

__all__ = ["modules_run", "unused_subtrees", "replace_with_identity"]


def modules_run(root: nn.Module, fn: Callable[[], Any]) -> Set[str]:
    """Names (relative to ``root``) of the submodules whose forward ``fn()`` calls."""
    seen: Set[str] = set()
    handles = []
    for name, module in root.named_modules(remove_duplicate=False):

        def hook(mod: nn.Module, args: Any, _name: str = name) -> None:
            seen.add(_name)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def unused_subtrees(root: nn.Module, used: Set[str]) -> List[str]:
    """Largest submodules with weights of which neither the module nor any descendant ran."""
    used_prefixes = set()
    for name in used:
        parts = name.split(".") if name else []
        for i in range(len(parts) + 1):
            used_prefixes.add(".".join(parts[:i]))
    out: List[str] = []
    for name, module in root.named_modules():
        if not name or name in used_prefixes or any(name.startswith(p + ".") for p in out):
            continue
        if _has_state(module):
            out.append(name)
    return out


def replace_with_identity(root: nn.Module, names: List[str]) -> None:
    """Swap each named submodule of ``root`` for an ``nn.Identity`` (its weights are dropped)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, nn.Identity())
