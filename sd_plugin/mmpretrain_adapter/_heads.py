"""Exit classifiers built from the user's own head config (private machinery)."""

from __future__ import annotations

import copy
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmpretrain.models.heads import ClsHead
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

__all__ = ["check_head", "build_exit_head", "run_head", "targets_of", "head_loss_fn", "UNSUPPORTED_HEADS"]

# Heads that subclass ClsHead but cannot classify a pooled exit feature.
UNSUPPORTED_HEADS = {
    "DeiTClsHead": "it needs the distillation token of DistilledVisionTransformer; use VisionTransformerClsHead",
    "ClsHead": "it has no classifier of its own (the backbone computes the logits); use a backbone without "
    "its classifier (e.g. VGG num_classes=-1), neck=dict(type='GlobalAveragePooling') and LinearClsHead",
}

SUPPORTED = "LinearClsHead, StackedLinearClsHead, VisionTransformerClsHead or another ClsHead with in_channels"


def check_head(head: Optional[nn.Module], head_cfg: Any) -> int:
    """Check that exit classifiers can be built like ``head``; return its input width."""
    if head is None:
        raise ValueError(
            "SelfDistillClassifier needs a classification head (model.head); the exits copy its type and loss."
        )
    name = type(head).__name__
    if not isinstance(head, ClsHead):
        raise TypeError(
            f"head {name} is not a single-label classification head (a subclass of mmpretrain's ClsHead, e.g. "
            "LinearClsHead). SelfDistillClassifier works on supervised ImageClassifier configs (backbone, optional "
            "neck, ClsHead-style head); multi-label heads and self-supervised algorithm configs (MoCo, SimCLR, "
            "BYOL, MAE, ...) are not supported."
        )
    if name in UNSUPPORTED_HEADS:
        raise TypeError(f"head {name} cannot be copied for the exits: {UNSUPPORTED_HEADS[name]}.")
    if not isinstance(head_cfg, dict):
        raise TypeError(f"SelfDistillClassifier needs the head as a config dict to copy it per exit, got {name}.")
    width = getattr(head, "in_channels", None)
    if not isinstance(width, int) or not hasattr(head, "num_classes"):
        raise TypeError(
            f"head {name} has no in_channels/num_classes, so exit classifiers cannot be built from it; use {SUPPORTED}."
        )
    return width


def build_exit_head(head_cfg: dict, in_channels: int) -> nn.Module:
    """A copy of the user's head config (same type, loss, options) with ``in_channels`` replaced."""
    cfg = copy.deepcopy(dict(head_cfg))
    cfg["in_channels"] = in_channels
    return MODELS.build(cfg)


def run_head(head: nn.Module, feats: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, pre_logits)`` from one call of ``head(feats)``.

    ``pre_logits`` (the input of the head's final classifier, the hint's feature)
    is recorded from inside the head's own forward, so a head with dropout in
    its hidden layers gives the very features its logits were computed from.
    """
    record: List[torch.Tensor] = []
    original: Callable[[Any], Any] = head.pre_logits  # type: ignore[assignment]

    def recording(x: Any) -> Any:
        out = original(x)
        record.append(out)
        return out

    # An instance attribute shadows the method for this one call.
    head.pre_logits = recording  # type: ignore[method-assign,assignment]
    try:
        logits = head(feats)
    finally:
        del head.pre_logits
    pre = record[-1] if record else original(feats)
    if not isinstance(logits, torch.Tensor) or not isinstance(pre, torch.Tensor):
        raise TypeError(
            f"head {type(head).__name__} returned {type(logits).__name__} logits and {type(pre).__name__} "
            f"pre_logits; self-distillation needs tensors. Use {SUPPORTED}."
        )
    return logits, pre


def targets_of(data_samples: List[DataSample]) -> torch.Tensor:
    """Targets packed as :class:`~mmpretrain.models.heads.ClsHead` packs them (soft scores after Mixup/CutMix)."""
    if not data_samples:
        raise ValueError("mode='loss' needs data_samples with gt_label (or gt_score).")
    if "gt_score" in data_samples[0]:
        return torch.stack([ds.gt_score for ds in data_samples])
    return torch.cat([ds.gt_label for ds in data_samples])


def head_loss_fn(head: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The head's own loss module as ``fn(logits, target)``, called as ClsHead calls it."""
    loss_module: Any = head.loss_module

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_module(logits, target, avg_factor=logits.size(0))

    return fn
