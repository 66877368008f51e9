"""Exit classifiers built from the user's own head (private machinery).

The probe pass measures the deepest head (:class:`HeadProbe`); :func:`plan_exit_heads`
then picks how every exit classifies its pooled feature, in this order:

1. ``'copy'``: a copy of the user's head config with ``in_channels`` set to the
   width the deepest head receives (measured, so heads that do not store
   ``in_channels``, e.g. ``VigClsHead`` and ``LeViTClsHead``, work too). Same
   type, loss, margin, hidden layers and dropout. Heads with a distillation
   classifier (``LeViTClsHead``, ``EfficientFormerClsHead``) are copied with
   ``distillation=False``: that second classifier is trained against a teacher
   model, which MMPretrain does not train either (it raises
   ``NotImplementedError``). Used when the head takes ``in_channels``, its
   input is one (N, W) tensor, and the copy gives the deepest head's logits and
   feature widths in eval and train mode.
2. ``'logits'``: for a head without a classifier of its own (``ClsHead``: the
   backbone computes the logits, e.g. Inception-v3, VGG, LeNet) a Linear from
   the exit's pooled feature (as wide as the widest tapped stage) to the class
   logits, followed by the head's own loss (``ClsHead.loss`` on the exit
   logits). The deepest head's input is then the backbone's logits, so the
   feature hint compares logits (an L2 logit regression, as in Ba & Caruana,
   "Do deep nets really need to be deep?", 2014); no extra feature is tapped.
3. ``'linear'``: otherwise (``ConformerHead``'s two branches, ``DeiTClsHead``'s
   two tokens, a head that does not take ``in_channels``) a ``LinearClsHead``
   with the head's own loss module (a copy: label smoothing, focal loss, soft
   targets) on features as wide as the deepest hint features, so the hint
   compares the exit's features with the deepest head's ``pre_logits``
   (several are concatenated).

Multi-label heads (``MultiLabelClsHead`` and its subclasses
``MultiLabelLinearClsHead``, ``CSRAClsHead``: a sigmoid per class) follow the
same order; their ``'logits'`` and ``'linear'`` exits are a
``MultiLabelLinearClsHead`` with the head's loss, ``thr`` and ``topk``.
``CSRAClsHead`` classifies the unpooled feature map, so its exits take the
``'linear'`` route and the hint compares their features with the
spatially averaged map (see ``_head_calls.hint_features``).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.nn as nn
from mmpretrain.models.heads import ClsHead, LinearClsHead, MultiLabelClsHead, MultiLabelLinearClsHead
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample, label_to_onehot

from sd_plugin._checks import check_class_labels

from ._head_calls import run_head

__all__ = [
    "check_head",
    "is_multi_label",
    "probe_head",
    "plan_exit_heads",
    "HeadProbe",
    "ExitHeadPlan",
    "targets_of",
]


def is_multi_label(head: nn.Module) -> bool:
    """Whether ``head`` predicts a sigmoid per class (MMPretrain's ``MultiLabelClsHead`` family)."""
    return isinstance(head, MultiLabelClsHead)


def check_head(head: Optional[nn.Module], head_cfg: Any) -> None:
    """Refuse heads that exits cannot be built for (no head, self-supervised or other non-classification heads)."""
    if head is None:
        raise ValueError(
            "SelfDistillClassifier needs a classification head (model.head); the exits copy its type and loss."
        )
    name = type(head).__name__
    if not isinstance(head, (ClsHead, MultiLabelClsHead)):
        raise TypeError(
            f"head {name} is not a classification head (a subclass of mmpretrain's ClsHead, e.g. LinearClsHead, "
            "or MultiLabelClsHead). SelfDistillClassifier works on supervised ImageClassifier configs (backbone, "
            "optional neck, classification head); self-supervised algorithm configs (MoCo, SimCLR, BYOL, MAE, ...) "
            "are not supported."
        )
    if not isinstance(head_cfg, dict):
        raise TypeError(f"SelfDistillClassifier needs the head as a config dict to copy it per exit, got {name}.")


@dataclass(frozen=True)
class HeadProbe:
    """The deepest head as the probe pass measured it.

    Attributes:
        num_classes: Width of its plain logits.
        feature_width: Width of its hint features (``pre_logits``, flattened and concatenated).
        input_width: Width of its input when that is one (N, W) tensor, else None.
        has_classifier: False when it returns its input unchanged (``ClsHead``: the backbone gives the logits).
    """

    num_classes: int
    feature_width: int
    input_width: Optional[int]
    has_classifier: bool


def probe_head(head: nn.Module, feats: Any) -> HeadProbe:
    """Measure ``head`` on the probe's backbone/neck output ``feats`` (eval mode, no grad)."""
    logits, features = run_head(head, feats)
    if logits.dim() != 2:
        raise TypeError(
            f"head {type(head).__name__} gives logits of shape {tuple(logits.shape)}; self-distillation needs "
            "(N, num_classes) logits of a single-label classifier."
        )
    last = feats[-1] if isinstance(feats, (tuple, list)) and feats else feats
    input_width = int(last.shape[1]) if isinstance(last, torch.Tensor) and last.dim() == 2 else None
    return HeadProbe(int(logits.shape[1]), int(features.shape[1]), input_width, has_classifier=logits is not last)


class _LinearToLogits:
    """For a head without its own classifier: the exit's Linear gives the logits, which are also its hint features."""

    fc: nn.Linear

    def pre_logits(self, feats: Any) -> torch.Tensor:
        return self.fc(feats[-1])

    def forward(self, feats: Any) -> torch.Tensor:
        return self.pre_logits(feats)


class _LogitsExitHead(_LinearToLogits, LinearClsHead):
    """Exit classifier of a single-label head without its own classifier (``ClsHead``)."""


class _MultiLabelLogitsExitHead(_LinearToLogits, MultiLabelLinearClsHead):
    """Exit classifier of a multi-label head without its own classifier (``MultiLabelClsHead``)."""


@dataclass
class ExitHeadPlan:
    """How every exit classifies its pooled feature (see the module docstring).

    Attributes:
        kind: ``'copy'``, ``'logits'`` or ``'linear'``.
        width: Width of the exit's pooled feature (the exit neck's output, the exit head's input).
        num_classes: Classes of the deepest head (measured).
    """

    kind: str
    width: int
    num_classes: int
    _head: nn.Module
    _cfg: Optional[dict] = None

    def build(self) -> nn.Module:
        """A new, independently initialised exit classifier."""
        if self.kind == "copy":
            return MODELS.build(copy.deepcopy(self._cfg))
        loss = copy.deepcopy(self._head.loss_module)
        logits = self.kind == "logits"
        if is_multi_label(self._head):
            ml = _MultiLabelLogitsExitHead if logits else MultiLabelLinearClsHead
            thr, topk = getattr(self._head, "thr", None), getattr(self._head, "topk", None)
            return ml(num_classes=self.num_classes, in_channels=self.width, loss=loss, thr=thr, topk=topk)
        topk = getattr(self._head, "topk", (1,))
        cls = _LogitsExitHead if logits else LinearClsHead
        return cls(num_classes=self.num_classes, in_channels=self.width, loss=loss, topk=topk)


def _init_params(head_type: Any) -> Sequence[str]:
    try:
        return list(inspect.signature(head_type.__init__).parameters)
    except (TypeError, ValueError):
        return []


def _copy_cfg(head: nn.Module, head_cfg: dict, probe: HeadProbe) -> Optional[dict]:
    """The user's head config with ``in_channels`` set for an exit, when the head takes it; else None."""
    params = _init_params(type(head))
    if probe.input_width is None or "in_channels" not in params:
        return None
    cfg = copy.deepcopy(dict(head_cfg))
    cfg["in_channels"] = probe.input_width
    if "distillation" in params:
        cfg["distillation"] = False
    return cfg


def _copy_works(cfg: dict, probe: HeadProbe) -> bool:
    """Whether a head built from ``cfg`` gives the deepest head's shapes in eval and train mode (throw-away copy)."""
    want = ((2, probe.num_classes), (2, probe.feature_width))
    try:
        head = MODELS.build(copy.deepcopy(cfg))
        x = (torch.zeros(2, probe.input_width or 0),)
        for training in (False, True):
            head.train(training)
            with torch.no_grad():
                logits, features = run_head(head, x)
            if (tuple(logits.shape), tuple(features.shape)) != want:
                return False
        return True
    except (NotImplementedError, RuntimeError, TypeError, ValueError, KeyError, AssertionError):
        return False


def plan_exit_heads(head: nn.Module, head_cfg: dict, probe: HeadProbe, tapped_channels: Sequence[int]) -> ExitHeadPlan:
    """Choose the exit classifiers for ``head`` (see the module docstring for the order)."""
    if not probe.has_classifier:
        width = max(tapped_channels) if tapped_channels else probe.num_classes
        return ExitHeadPlan("logits", int(width), probe.num_classes, head)
    cfg = _copy_cfg(head, head_cfg, probe)
    if cfg is not None and _copy_works(cfg, probe):
        return ExitHeadPlan("copy", int(cfg["in_channels"]), probe.num_classes, head, cfg)
    return ExitHeadPlan("linear", probe.feature_width, probe.num_classes, head)


def targets_of(data_samples: List[DataSample], num_classes: int, multi_label: bool = False) -> torch.Tensor:
    """Targets packed as the head packs them: class indices (N,), soft scores (N, C) after Mixup/CutMix, and for a
    multi-label head (``MultiLabelClsHead``) always (N, C): ``gt_score``, else the labels as multi-hot rows."""
    if not data_samples:
        raise ValueError("mode='loss' needs data_samples with gt_label (or gt_score).")
    if "gt_score" in data_samples[0]:
        return torch.stack([ds.gt_score for ds in data_samples])
    if multi_label:
        check_class_labels(torch.cat([ds.gt_label for ds in data_samples]), num_classes)  # before one-hot encoding
        return torch.stack([label_to_onehot(ds.gt_label, num_classes) for ds in data_samples]).float()
    return torch.cat([ds.gt_label for ds in data_samples])
