"""Exit policies: when an exit is confident enough to answer, and saving the thresholds.

A policy holds one threshold per shallow exit, ``exit1`` (the shallowest) first;
the deepest classifier always answers what is left. With ``criterion='max_prob'`` exit ``k`` answers a sample
when its maximum softmax probability is ``>= thresholds[k]``; with ``criterion='margin'`` when the top
probability exceeds the runner-up's by ``>= thresholds[k]``; with ``criterion='entropy'`` when the entropy of its
softmax (nats) is ``<= thresholds[k]``. A threshold of ``None`` means the exit never answers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .._io import atomic_write

__all__ = [
    "CRITERIA",
    "ExitPolicy",
    "confidence_scores",
    "criterion_sign",
    "exit_decisions",
    "thresholds_to_scores",
]

CRITERIA = ("max_prob", "margin", "entropy")
#: Criteria whose thresholds are lower bounds on the score (the others, entropy, are upper bounds on it).
HIGHER_IS_CONFIDENT = ("max_prob", "margin")


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")


def criterion_sign(criterion: str) -> float:
    """+1 where a threshold is the score itself (max_prob, margin), -1 where it is minus the score (entropy)."""
    _check_criterion(criterion)
    return 1.0 if criterion in HIGHER_IS_CONFIDENT else -1.0


def confidence_scores(logits: torch.Tensor, criterion: str = "max_prob") -> torch.Tensor:
    """Per-sample confidence, higher is more confident: max softmax probability, its margin over the runner-up's,
    or minus the entropy.

    Args:
        logits: (..., N, C) logits.
        criterion: 'max_prob', 'margin' or 'entropy'.

    Returns:
        (..., N) scores in float32.
    """
    _check_criterion(criterion)
    log_p = logits.float().log_softmax(dim=-1)
    if criterion == "max_prob":
        return log_p.max(dim=-1).values.exp()
    if criterion == "margin":
        if logits.shape[-1] < 2:
            raise ValueError(f"criterion 'margin' needs at least 2 classes, got logits of shape {tuple(logits.shape)}.")
        top2 = log_p.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    return (log_p.exp() * log_p).sum(dim=-1)  # minus the entropy


def thresholds_to_scores(thresholds: Sequence[Optional[float]], criterion: str) -> torch.Tensor:
    """Thresholds in the criterion's own units -> lower bounds on :func:`confidence_scores` (float64)."""
    _check_criterion(criterion)
    out = []
    for t in thresholds:
        if t is None or (isinstance(t, float) and math.isinf(t) and (t > 0) == (criterion_sign(criterion) > 0)):
            out.append(math.inf)
        else:
            out.append(criterion_sign(criterion) * float(t))
    return torch.tensor(out, dtype=torch.float64)


def exit_decisions(scores: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Index of the first exit whose score clears its bound, per sample.

    Args:
        scores: (E, N) confidence scores of the E shallow exits.
        bounds: (E,) lower bounds from :func:`thresholds_to_scores`.

    Returns:
        (N,) int64 exit indices; ``E`` means the deepest classifier.
    """
    if scores.dim() != 2 or bounds.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (E, N) and bounds (E,), got {tuple(scores.shape)} and {tuple(bounds.shape)}.")
    passes = scores >= bounds.to(scores.device)[:, None]
    idx = torch.full((scores.shape[1],), scores.shape[0], dtype=torch.long, device=scores.device)
    for k in range(scores.shape[0] - 1, -1, -1):  # the shallowest exit that clears its bound wins
        idx = torch.where(passes[k], k, idx)
    return idx


@dataclass
class ExitPolicy:
    """Thresholds of an early-exit model, with how they were chosen.

    Attributes:
        thresholds: One per shallow exit (shallowest first); ``None``: never answers.
        criterion: 'max_prob' (answer when max softmax prob >= threshold) or
            'entropy' (answer when entropy <= threshold).
        info: Free-form metadata, e.g. the calibration target and its measured
            accuracy and cost on the calibration set.
        ensemble_weights: The calibrated ensemble: one weight per classifier (``exit1`` ... the deepest),
            fitted on the calibration data (:func:`~sd_plugin.core.ensemble.fit_ensemble_weights`); ``None``:
            none fitted (BYOT's equal-weight ensemble is ``ensemble_logits(logits)`` without weights).
    """

    thresholds: List[Optional[float]]
    criterion: str = "max_prob"
    info: Dict[str, Any] = field(default_factory=dict)
    ensemble_weights: Optional[List[float]] = None

    def __post_init__(self) -> None:
        _check_criterion(self.criterion)
        if isinstance(self.thresholds, (str, bytes)) or not isinstance(self.thresholds, Sequence):
            raise TypeError(f"thresholds must be a list of floats (or None), got {type(self.thresholds).__name__}.")
        clean: List[Optional[float]] = []
        for t in self.thresholds:
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
                raise TypeError(f"thresholds must hold floats or None, got {t!r}.")
            if t is not None and math.isnan(t):
                raise ValueError("a threshold is NaN; use None for an exit that never answers.")
            never = t is not None and math.isinf(t) and (t > 0) == (criterion_sign(self.criterion) > 0)
            clean.append(None if t is None or never else float(t))
        self.thresholds = clean
        if self.ensemble_weights is not None:
            w = list(self.ensemble_weights)
            if len(w) != len(clean) + 1 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
                raise ValueError(
                    f"ensemble_weights must hold one number per classifier ({len(clean) + 1}: every exit and the "
                    f"deepest), got {self.ensemble_weights!r}."
                )
            if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"ensemble_weights must be finite, non-negative and not all zero, got {w}.")
            self.ensemble_weights = [float(x) for x in w]

    @property
    def num_exits(self) -> int:
        return len(self.thresholds)

    def bounds(self) -> torch.Tensor:
        """(E,) lower bounds on :func:`confidence_scores`."""
        return thresholds_to_scores(self.thresholds, self.criterion)

    def exits(self, exit_logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Which exit answers each sample, from the logits of (at least) every shallow exit.

        Args:
            exit_logits: (E or E + 1, N, C) logits, or a list of (N, C), ``exit1`` first.

        Returns:
            (N,) int64 exits numbered as the training log names them: 1 (``exit1``) ... E + 1 (the deepest).
        """
        return self._decide(exit_logits) + 1

    def _decide(self, exit_logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        logits = torch.stack(list(exit_logits)) if not isinstance(exit_logits, torch.Tensor) else exit_logits
        if logits.dim() != 3 or logits.shape[0] not in (self.num_exits, self.num_exits + 1):
            raise ValueError(
                f"expected logits of {self.num_exits} exits (optionally plus the deepest) as (E, N, C), "
                f"got shape {tuple(logits.shape)}."
            )
        return exit_decisions(confidence_scores(logits[: self.num_exits], self.criterion), self.bounds())

    def save(self, path: Union[str, Path]) -> None:
        """Write the policy as JSON."""
        text = json.dumps(asdict(self), indent=2, allow_nan=False) + "\n"
        with atomic_write(path, "w") as f:
            f.write(text)

    @classmethod
    def load(cls, path: Union[str, Path]) -> ExitPolicy:
        """Read a policy written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not an exit policy file (not JSON: {err}); write one with save().") from err
        if not isinstance(data, dict) or "thresholds" not in data:
            raise ValueError(f"{path} is not an exit policy file (no 'thresholds' key).")
        return cls(
            thresholds=data["thresholds"],
            criterion=data.get("criterion", "max_prob"),
            info=data.get("info", {}),
            ensemble_weights=data.get("ensemble_weights"),
        )
