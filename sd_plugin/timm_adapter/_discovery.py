"""Finding where a timm model's stages end, and what their features look like.

Stage ends come from timm's own feature API (``model.feature_info``: module
name, channels and reduction of every feature level). A probe forward in eval
mode under ``no_grad`` then records, through forward hooks, the layout (NCHW,
NHWC or NLC tokens), width and spatial size of each of those outputs and of the
input of the model's own classifier, so nothing is hard-coded per architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..core import ExitPoint, SelfDistillConfig
from ..core.engine import find_exit_layout

__all__ = ["Discovery", "discover", "default_input_size", "pool_teacher"]


@dataclass(frozen=True)
class _Level:
    module: str
    num_chs: int
    reduction: int


@dataclass(frozen=True)
class Discovery:
    """What the probe found.

    Attributes:
        kind: 'stage' (stage-wise backbone) or 'block' (plain token backbone).
        positions: Module names of every stage (or block) end, shallowest first.
        points: The exit points chosen (relative to the timm model).
        teacher: Where the deepest classifier's input features are read.
        feature_dim: Width of the pooled teacher features.
        num_classes: Number of classes of the model's own classifier.
    """

    kind: str
    positions: Tuple[str, ...]
    points: Tuple[ExitPoint, ...]
    teacher: ExitPoint
    feature_dim: int
    num_classes: int


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def default_input_sizes(model: nn.Module) -> List[Tuple[int, int, int]]:
    """(C, H, W) the model was built for, most likely first.

    The size comes from ``patch_embed.img_size``, ``img_size``, else timm's data config. The channels from the first
    convolution (a model made with ``in_chans=1``), then from the data config: the first convolution is not always
    the first layer (TResNet's space-to-depth stem feeds it 16x the input channels).
    """
    from timm.data import resolve_model_data_config

    cfg_size = tuple(resolve_model_data_config(model)["input_size"])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = [int(first_conv.in_channels)] if first_conv is not None else []
    chans += [c for c in (int(cfg_size[0]),) if c not in chans]
    hw = int(cfg_size[1]), int(cfg_size[2])
    for owner in (getattr(model, "patch_embed", None), model):
        size = getattr(owner, "img_size", None) if owner is not None else None
        if isinstance(size, int):
            hw = size, size
            break
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            hw = int(size[0]), int(size[1])
            break
    return [(c, *hw) for c in chans]


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The most likely (C, H, W) the model was built for (see :func:`default_input_sizes`)."""
    return default_input_sizes(model)[0]


def _levels(model: nn.Module) -> List[_Level]:
    info = getattr(model, "feature_info", None)
    entries: Sequence[Any] = info if isinstance(info, (list, tuple)) else getattr(info, "info", None) or []
    levels: List[_Level] = []
    seen = set()
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("module"), str) or entry["module"] in seen:
            continue
        seen.add(entry["module"])
        levels.append(_Level(entry["module"], int(entry.get("num_chs", 0)), int(entry.get("reduction", 0))))
    if not levels:
        raise ValueError(
            f"{_model_name(model)} has no timm feature_info, so its intermediate features cannot be reached. "
            "Use a timm model that supports features_only=True (see timm.list_models()), or train it "
            "without self-distillation."
        )
    return levels


def _classifier(model: nn.Module) -> Tuple[str, nn.Module]:
    name = _model_name(model)
    if getattr(model, "num_classes", None) == 0:
        raise ValueError(
            f"{name} was created with num_classes=0 (no classifier): self-distillation needs the model's own "
            "classifier as the deepest exit. Create it with num_classes > 0, e.g. "
            f"timm.create_model('{name}', num_classes=10)."
        )
    if not hasattr(model, "get_classifier"):
        raise TypeError(f"{name} is not a timm classifier (it has no get_classifier()); pass a timm model.")
    head: Any = getattr(model, "get_classifier")()  # noqa: B009 - typed as a plain callable
    if isinstance(head, (tuple, list)) and len(head) > 0:
        head = head[0]  # (head, head_dist) of distilled models: the main head's input is the teacher
    if isinstance(head, nn.ModuleList) and len(head) > 0:
        head = head[-1]  # one head per branch or stage (CrossViT, EfficientViM): the deepest one
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise ValueError(
            f"{name} has no classifier (get_classifier() gives {type(head).__name__}); create it with num_classes > 0."
        )
    for mod_name, mod in model.named_modules():
        if mod is head:
            return mod_name, mod
    raise ValueError(f"{name}'s classifier is not one of its submodules; it cannot be tapped.")


def pool_teacher(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """The classifier's input as (N, D) features: (N, C, 1, 1) flattens exactly, larger maps are averaged."""
    if fmt == "NCHW":
        return t.mean(dim=(2, 3)) if t.shape[2] * t.shape[3] > 1 else t.flatten(1)
    if fmt == "NHWC":
        return t.mean(dim=(1, 2)) if t.shape[1] * t.shape[2] > 1 else t.flatten(1)
    if fmt == "NLC":
        return t.mean(dim=1)
    return t


def _candidates(model: nn.Module) -> Tuple[List[str], Dict[str, int]]:
    """Stage ends from timm's feature_info (a container the model iterates over: its last element)."""
    names: List[str] = []
    channels: Dict[str, int] = {}
    for lv in _levels(model):
        name = lv.module
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(mod) > 0:
            last = list(mod.keys())[-1] if isinstance(mod, nn.ModuleDict) else str(len(mod) - 1)
            name = f"{name}.{last}"
        names.append(name)
        channels[name] = lv.num_chs
    return names, channels


def discover(model: nn.Module, config: SelfDistillConfig, input_size: Sequence[int]) -> Discovery:
    """Probe ``model`` once (through the core exit engine) and choose its exit points as ``config`` asks."""
    name = _model_name(model)
    head_name, _ = _classifier(model)
    try:
        names, channels = _candidates(model)
    except ValueError:
        names, channels = [], {}  # no feature_info: the engine finds the main path on its own
    layout = find_exit_layout(
        model,
        model,
        tuple(input_size),
        config,
        candidates=names or None,
        channels=channels,
        prefer_nhwc=getattr(model, "output_fmt", "NCHW") == "NHWC",
        teacher=head_name,
        name=name,
        fix="Pass exit_indices=[...] (indices into the stage ends) or another input_size=(C, H, W).",
    )
    if layout.teacher is None or layout.output_shape is None or len(layout.output_shape) != 2:
        raise TypeError(f"{name} must return (N, num_classes) logits in eval mode, got shape {layout.output_shape}.")
    return Discovery(
        kind=layout.kind,
        positions=layout.positions,
        points=layout.points,
        teacher=layout.teacher,
        feature_dim=layout.teacher.channels,
        num_classes=int(layout.output_shape[1]),
    )
