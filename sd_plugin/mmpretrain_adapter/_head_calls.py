"""Calling an MMPretrain head: its logits, hint features and its own ``loss()`` in one pass (private machinery).

Every head is called through its own methods, so whatever the head does (a
margin that needs the target, two classifiers, dropout in hidden layers) is what
the self-distillation terms see:

- ``logits``: the head's *plain* prediction logits, those its ``predict`` turns
  into scores: a head returning several logits (``ConformerHead``: conv and
  transformer branches) gives their sum, as its ``predict`` does; a margin head
  (``ArcFaceClsHead``, whose ``forward`` takes the target during ``loss``) gives
  its logits without the margin (the cosine times the scale), computed from the
  very ``pre_logits`` of the loss call.
- ``features``: the head's ``pre_logits`` (the input of its final classifier),
  recorded from inside the call, so dropout in hidden layers gives the features
  the logits came from; several tensors (``DeiTClsHead``'s class and
  distillation tokens, ``ConformerHead``'s two branches) are flattened and
  concatenated. A head that classifies an unpooled (N, C, H, W) feature map
  (``CSRAClsHead``) gives the map averaged over H and W: the exits' pooled
  features are compared with what a pooled head would see, not with a vector
  of C * H * W values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import torch
import torch.nn as nn

__all__ = ["HeadOutput", "run_head", "head_loss", "deepest_head_loss", "given_loss", "plain_logits", "hint_features"]


@dataclass
class HeadOutput:
    """What one call of a head gives the self-distillation terms.

    Attributes:
        logits: Plain prediction logits (N, C) (no margin; several logits summed).
        features: Hint features (N, D): the head's ``pre_logits``.
        loss: The label loss from the head's own ``loss()`` (sum of its ``loss*`` terms), or None.
        extras: The other entries ``loss()`` returned (e.g. ``accuracy_top-1`` with ``cal_acc``).
    """

    logits: torch.Tensor
    features: torch.Tensor
    loss: Optional[torch.Tensor] = None
    extras: Optional[Dict[str, torch.Tensor]] = None


def plain_logits(head: nn.Module, out: Any) -> torch.Tensor:
    """The prediction logits from the output of ``head.forward``: a tensor, or the sum of several (N, C) tensors."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        shapes = {tuple(t.shape) for t in out}
        if len(shapes) == 1:
            total = out[0]
            for t in out[1:]:
                total = total + t
            return total
    raise TypeError(
        f"head {type(head).__name__} returned {_describe(out)} from forward; self-distillation needs (N, num_classes) "
        "logits or a tuple of them (summed, as ConformerHead.predict does)."
    )


def hint_features(head: nn.Module, pre: Any) -> torch.Tensor:
    """The hint features from ``head.pre_logits``: a tensor flattened to (N, D) (an (N, C, H, W) map averaged over
    H and W first), or several concatenated."""
    parts = list(pre) if isinstance(pre, (tuple, list)) else [pre]
    if not parts or not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in parts):
        raise TypeError(
            f"head {type(head).__name__}.pre_logits gave {_describe(pre)}; the feature hint needs (N, D) features "
            "or (N, C, H, W) maps (or a tuple of them)."
        )
    flat = [(t.mean(dim=(2, 3)) if t.dim() == 4 else t).flatten(1) for t in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of [{', '.join(_describe(t) for t in x)}]"
    return type(x).__name__


class _Recorder:
    """Records ``forward`` calls and ``pre_logits`` outputs of one head while installed (see :meth:`on`)."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.calls: List[Tuple[int, Any]] = []  # (number of extra arguments, output) per forward call
        self.pre: List[Any] = []

    @contextlib.contextmanager
    def on(self) -> Iterator[_Recorder]:
        head: Any = self.head
        forward, pre_logits = head.forward, head.pre_logits

        def recording_forward(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            self.calls.append((len(args) - 1 + len(kwargs), out))
            return out

        def recording_pre_logits(*args: Any, **kwargs: Any) -> Any:
            out = pre_logits(*args, **kwargs)
            self.pre.append(out)
            return out

        # Instance attributes shadow the methods for this one call (nothing is left behind, no hook is registered).
        head.forward = recording_forward  # type: ignore[method-assign]
        head.pre_logits = recording_pre_logits  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            del head.forward
            del head.pre_logits


@contextlib.contextmanager
def _fixed_pre_logits(head: nn.Module, pre: Any) -> Iterator[None]:
    """``head.pre_logits`` returns ``pre`` (already computed) for the duration."""
    head.pre_logits = lambda *args, **kwargs: pre  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del head.pre_logits


def run_head(head: nn.Module, feats: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` from one call of ``head(feats)`` (inference, the probe)."""
    with _Recorder(head).on() as rec:
        out = head(feats)
    pre = rec.pre[-1] if rec.pre else cast(Any, head).pre_logits(feats)
    return plain_logits(head, out), hint_features(head, pre)


def head_loss(head: nn.Module, feats: Any, data_samples: List[Any]) -> HeadOutput:
    """The head's own ``head.loss(feats, data_samples)``, and the logits and features of that very call.

    The head runs once. Only when its ``forward`` was called with more than the
    features (a margin head, given the target) are the plain logits computed by
    a second ``forward(feats)`` that reuses the recorded ``pre_logits`` (the
    margin-free final layer only, with gradients, no new dropout draw).
    """
    with _Recorder(head).on() as rec:
        losses = cast(Any, head).loss(feats, data_samples)
    if not isinstance(losses, dict) or not any("loss" in k for k in losses):
        raise TypeError(
            f"head {type(head).__name__}.loss returned {_describe(losses)}; a ClsHead returns a dict with 'loss'."
        )
    label = [v for k, v in losses.items() if "loss" in k]
    total = label[0] if len(label) == 1 else sum(label[1:], label[0])
    extras = {k: v for k, v in losses.items() if "loss" not in k}
    if not rec.calls:  # a head whose loss does not call its forward: run it once more for the logits
        logits, features = run_head(head, feats)
        return HeadOutput(logits, features, total, extras)
    extra_args, out = rec.calls[-1]
    pre = rec.pre[-1] if rec.pre else cast(Any, head).pre_logits(feats)
    if extra_args:
        with _fixed_pre_logits(head, pre):
            out = head(feats)
    return HeadOutput(plain_logits(head, out), hint_features(head, pre), total, extras)


def deepest_head_loss(head: nn.Module, feats: Any, data_samples: List[Any]) -> HeadOutput:
    """:func:`head_loss` of the user's head; a head that MMPretrain cannot train is named with the fix."""
    try:
        return head_loss(head, feats, data_samples)
    except NotImplementedError as e:
        raise ValueError(
            f"head {type(head).__name__} cannot be trained as configured ({e}); the plain ImageClassifier cannot be "
            "either. Distilled heads (LeViTClsHead, EfficientFormerClsHead) train with head.distillation=False."
        ) from e


def given_loss(out: HeadOutput) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The label-loss function the core criterion calls: it gives the head's own ``loss()`` value, already computed."""
    if out.loss is None:
        raise ValueError("this head output carries no loss (it comes from run_head, not head_loss).")
    value = out.loss

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return value

    return fn
