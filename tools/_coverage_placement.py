"""Sanity of where the exits sit, for the coverage checks: gradients and equality pass even for useless exits.

An exit placement is refused when an exit module is nested in (or the same as) another exit's module, when an
exit reads the input image itself, or when an exit reads the last element of a backbone container (``stages.3`` of
a 4-stage net, ``layers.11`` of a 12-block ViT): the deepest classifier's own stage, whose exit would duplicate it.
The last block of one stage's list is a stage end, not that: a list inside a list of stages (``stages.0.1``) or one of
numbered lists (``serial_blocks2.1`` beside ``serial_blocks3``).
"""

from __future__ import annotations

import re
from typing import Any, List, Optional

import torch
import torch.nn as nn


def _has_next_numbered_sibling(root: nn.Module, name: str) -> bool:
    """Whether ``name`` ends in a number n and its parent has a module named like it with n + 1."""
    match = re.fullmatch(r"(.*?)(\d+)", name)
    if not match:
        return False
    head, number = match.groups()
    try:
        root.get_submodule(f"{head}{int(number) + 1}")
    except AttributeError:
        return False
    return True


def _last_tensor(value: Any) -> Optional[torch.Tensor]:
    while isinstance(value, (tuple, list)) and value:
        value = value[-1]
    return value if isinstance(value, torch.Tensor) else None


def _deeper_after(model: Any, name: str, x: Optional[torch.Tensor]) -> bool:
    """Whether the model's final features (``forward_features``, else the tapped module's output) are at another
    resolution than the exit's feature at ``name``: more downsampling runs after the container (SelecSLS's ``head``
    convolutions after ``features``), so its last element is not the deepest stage. False when it cannot tell."""
    if x is None:
        return False
    tapped: nn.Module = model.tapped_module()
    point = next(p for p in model.exit_points if str(p.module) == name)
    k = list(model.exit_points).index(point)
    getattr(model.exit_engine, "ensure_installed", lambda: None)()
    with torch.no_grad():
        feature = model.exit_engine.run_to(k, lambda: model.forward_deepest(x))
        run = getattr(tapped, "forward_features", None) or tapped
        final = _last_tensor(run(x))
    if final is None or final.dim() < 3 or not isinstance(feature, torch.Tensor) or feature.dim() < 3:
        return False
    fmt = str(getattr(point, "fmt", ""))
    exit_hw = tuple(feature.shape[1:3]) if fmt == "NHWC" else tuple(feature.shape[2:]) if fmt == "NCHW" else None
    if exit_hw is None or final.dim() != 4:
        return False
    return exit_hw not in (tuple(final.shape[2:]), tuple(final.shape[1:3]))


def placement_problem(model: Any, x: torch.Tensor) -> Optional[str]:
    """Why the exits of ``model`` (a ``MultiExitModel`` in eval mode) are misplaced, or None; ``x`` is an input."""
    tapped: nn.Module = model.tapped_module()
    names = [str(p.module) for p in model.exit_points]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a == b or b.startswith(a + ".") or a.startswith(b + ".") or "" in (a, b):
                return f"exit modules {a!r} and {b!r} are the same module or nested"
    for name in names:
        parent, _, index = name.rpartition(".")
        if not index.isdigit():
            continue
        if parent.rpartition(".")[2].isdigit():
            continue  # the last block of one stage's block list (Twins' ``stages.0.1``): a stage end, not the top
        if _has_next_numbered_sibling(tapped, parent):
            continue  # one of numbered stage lists (CoaT's ``serial_blocks2`` before ``serial_blocks3``)
        container = tapped.get_submodule(parent) if parent else tapped
        if (
            isinstance(container, (nn.ModuleList, nn.Sequential))
            and int(index) == len(container) - 1
            and len(container) > 1
            and not _deeper_after(model, name, x)
        ):
            return f"exit at {name!r}, the last of the {len(container)} modules in {parent or 'the model'!r}"
    engine = getattr(model, "exit_engine", None)
    if engine is None:
        return None
    getattr(engine, "ensure_installed", lambda: None)()
    with torch.no_grad(), engine.capture() as cap:
        model.forward_deepest(x)
    features: List[torch.Tensor] = list(cap.features)
    for name, f in zip(names, features):
        if isinstance(f, torch.Tensor) and f.shape == x.shape and torch.equal(f, x):
            return f"exit at {name!r} reads the input image itself"
        if isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[1] == x.shape[1] and f.shape[0] == x.shape[0]:
            return f"exit at {name!r} reads a {tuple(f.shape)} feature with the input's {x.shape[1]} channels"
    return None
