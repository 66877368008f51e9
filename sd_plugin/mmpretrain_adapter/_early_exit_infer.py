"""Inference of ``SelfDistillClassifier`` through MMPretrain: exits run only when asked for.

- Per-exit scores (``exit_scores`` on every DataSample) cost one pass of every
  exit. They are computed in ``val_step``/``test_step`` only while a metric that
  reads them exists (a metric declares it with the class attribute
  ``requires_exit_scores = True`` and registers itself with
  :func:`request_exit_scores`, as :class:`MultiExitAccuracy` does). With MMPretrain's
  default ``Accuracy``, ``ImageClassificationInferencer``, ``predict`` or
  ``tools/test.py`` run the plain model: no exit module is called.
- ``early_exit=dict(policy='policy.json')`` (or ``thresholds=[...]``,
  ``criterion=...``) in the model config makes ``predict`` and the ``'tensor'`` mode
  answer each sample at the first confident exit (:mod:`sd_plugin.deploy.early_exit`).
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import torch

__all__ = ["EarlyExitSettings", "early_exit_logits", "exit_scores_requested", "parse_early_exit", "request_exit_scores"]

_REQUESTERS: weakref.WeakSet = weakref.WeakSet()
_GUARD = threading.Lock()


def request_exit_scores(metric: Any) -> None:
    """Register ``metric`` as a reader of ``exit_scores`` for as long as it lives."""
    with _GUARD:
        _REQUESTERS.add(metric)


def exit_scores_requested() -> bool:
    """Whether a live metric reads the per-exit scores (then ``val_step``/``test_step`` compute every exit)."""
    with _GUARD:
        return len(_REQUESTERS) > 0


class EarlyExitSettings:
    """Thresholds (as bounds on the confidence score) and criterion of the config's ``early_exit`` option."""

    def __init__(self, bounds: List[float], criterion: str, source: str) -> None:
        self.bounds = bounds
        self.criterion = criterion
        self.source = source

    def __repr__(self) -> str:
        return f"EarlyExitSettings(criterion={self.criterion!r}, source={self.source!r})"


_KEYS = ("policy", "thresholds", "criterion")


def parse_early_exit(option: Optional[Mapping[str, Any]], num_exits: int) -> Optional[EarlyExitSettings]:
    """Validate the ``early_exit`` model option: ``dict(policy='policy.json')`` or ``dict(thresholds=[...])``."""
    from sd_plugin.deploy.policy import ExitPolicy

    if option is None:
        return None
    if not isinstance(option, Mapping):
        raise TypeError(
            f"early_exit must be a dict such as dict(policy='policy.json') or dict(thresholds=[0.9, 0.8, 0.7]), "
            f"got {type(option).__name__}."
        )
    unknown = sorted(set(option) - set(_KEYS))
    if unknown or ("policy" in option) == ("thresholds" in option):
        raise ValueError(
            f"early_exit takes either policy='policy.json' (written by ExitPolicy.save / calibrate) or "
            f"thresholds=[...] (one per exit, exit1 first) plus an optional criterion; got keys {sorted(option)}."
        )
    if "policy" in option:
        path = Path(str(option["policy"])).expanduser()
        if not path.is_file():
            raise ValueError(
                f"early_exit policy file {str(path)!r} not found: write it with ExitPolicy.save (e.g. from "
                "calibrate(...)) or give thresholds=[...] instead."
            )
        policy = ExitPolicy.load(path)
        if "criterion" in option and option["criterion"] != policy.criterion:
            raise ValueError(
                f"early_exit criterion {option['criterion']!r} conflicts with {path}'s {policy.criterion!r}."
            )
        source = str(path)
    else:
        policy = ExitPolicy(list(option["thresholds"]), option.get("criterion", "max_prob"))
        source = "thresholds"
    if policy.num_exits != num_exits:
        raise ValueError(
            f"early_exit gives {policy.num_exits} thresholds for a model with {num_exits} exits: give one per exit "
            "(exit1 first; None for an exit that should never answer)."
        )
    return EarlyExitSettings(policy.bounds().tolist(), policy.criterion, source)


def early_exit_logits(model: Any, inputs: torch.Tensor, settings: EarlyExitSettings) -> Tuple[torch.Tensor, Any]:
    """Early-exit logits (N, C) and each sample's exit (1-based; ``num_exits + 1``: the deepest)."""
    from sd_plugin.deploy.early_exit import early_exit_forward

    out = early_exit_forward(model, inputs, settings.bounds, settings.criterion)
    return out.logits, out.exit
