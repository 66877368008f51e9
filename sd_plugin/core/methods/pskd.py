"""PS-KD (Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets", ICCV 2021).

The target of a sample at epoch t is ``(1 - a_t) * y + a_t * p_{t-1}``: the label
mixed with the model's own prediction for that sample from the previous epoch,
with ``a_t = a_T * t / T`` growing linearly over the ``T`` epochs (authors:
``a_T = 0.8``). Since cross-entropy is linear in the target, the loss is
``(1 - a_t) * label_loss + a_t * CE(p_{t-1}, z)``, so the label part keeps the
user's own loss (label smoothing, Mixup/CutMix soft targets).

:class:`PastPredictions` holds ``p_{t-1}``, one row per training sample keyed by
its data-set index, kept identical on every process (each step's rows are
all-gathered), and saved with checkpoints through ``state_dict``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["pskd_alpha_at", "pskd_term", "PastPredictions"]


def pskd_alpha_at(alpha_final: float, progress: float) -> float:
    """``a_t = a_T * progress``, ``progress = epoch / max_epochs`` in [0, 1]."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"training progress must be in [0, 1], got {progress}.")
    return alpha_final * progress


def pskd_term(logits: torch.Tensor, past_probs: torch.Tensor) -> torch.Tensor:
    """``CE(past_probs, softmax(logits))``: cross-entropy to the past prediction, batch mean, float32."""
    if logits.shape != past_probs.shape:
        raise ValueError(
            f"past predictions {tuple(past_probs.shape)} must have the logits' shape {tuple(logits.shape)}."
        )
    return -(past_probs.detach().float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (first dimension may differ per rank) from every rank, rank order."""
    world = dist.get_world_size()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


class PastPredictions:
    """Each training sample's latest softmax prediction, keyed by data-set index.

    The table grows to the largest index seen and lives in CPU memory (float32,
    4 x num_samples x num_classes bytes: 3.2 MB for 8,000 CIFAR-10 images,
    5.1 GB for ImageNet-1k).
    Under ``torch.distributed`` every update is all-gathered, so all processes
    hold the same table and any of them can save it.
    """

    def __init__(self) -> None:
        self.probs: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None

    def _grow(self, upto: int, num_classes: int) -> None:
        if self.probs is not None and self.probs.shape[1] != num_classes:
            raise ValueError(
                f"PS-KD past predictions have {self.probs.shape[1]} classes, the model now gives {num_classes}."
            )
        have = 0 if self.probs is None else self.probs.shape[0]
        if upto <= have:
            return
        size = max(upto, 2 * have)
        probs = torch.zeros(size, num_classes)
        seen = torch.zeros(size, dtype=torch.bool)
        if self.probs is not None and self.seen is not None:
            probs[:have] = self.probs
            seen[:have] = self.seen
        self.probs, self.seen = probs, seen

    def lookup(self, index: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Past predictions of ``index`` (N,), ``fallback`` (N, C) rows where a sample was not seen yet."""
        _check_index(index, fallback.shape[0])
        if self.probs is None or self.seen is None:
            return fallback.float()
        idx = index.detach().cpu().long()
        out = fallback.detach().float().cpu().clone()
        inside = idx < self.probs.shape[0]
        rows = idx[inside]
        known = torch.zeros_like(inside)
        known[inside] = self.seen[rows]
        out[known] = self.probs[idx[known]]
        return out.to(fallback.device)

    def update(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Store ``probs`` (N, C) for ``index`` (N,), on every process."""
        _check_index(index, probs.shape[0])
        idx, p = index.detach().long(), probs.detach().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            idx, p = _gather(idx), _gather(p)
        idx, p = idx.cpu(), p.cpu()
        self._grow(int(idx.max()) + 1 if idx.numel() else 0, p.shape[1])
        if idx.numel():
            assert self.probs is not None and self.seen is not None
            self.probs[idx] = p
            self.seen[idx] = True

    def state_dict(self) -> Dict[str, Any]:
        return {"probs": self.probs, "seen": self.seen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"probs", "seen"}:
            raise ValueError(f"not a PS-KD past-predictions state (keys probs, seen), got {type(state).__name__}.")
        probs, seen = state["probs"], state["seen"]
        if (probs is None) != (seen is None):
            raise ValueError("PS-KD state: probs and seen must both be tensors or both None.")
        self.probs = None if probs is None else probs.detach().float().cpu().clone()
        self.seen = None if seen is None else seen.detach().bool().cpu().clone()


def _check_index(index: torch.Tensor, n: int) -> None:
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.shape[0] != n:
        got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"PS-KD needs one data-set index per sample, (N,) = ({n},), got {got}.")
    if index.dtype.is_floating_point or (index.numel() and int(index.min()) < 0):
        raise ValueError("PS-KD sample indices must be non-negative integers (the data set's sample_idx).")
