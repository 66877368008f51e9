"""CS-KD (Yun et al., "Regularizing Class-wise Predictions via Self-knowledge Distillation", CVPR 2020).

Each training sample comes with a partner of the same class; the sample's
softened prediction is pulled towards the partner's (detached) one:
``T**2 * KL(softmax(z_partner / T) || softmax(z_sample / T))`` (authors: T = 4,
weight 1). Here the pairs sit next to each other in the batch, anchor at even
positions and partner at odd ones, as :func:`class_pair_order` lays them out;
both members also get the ordinary label loss, so a step sees the same number of
labelled images as plain training (the authors add a second, gradient-free half
batch of partners; ours keeps the step cost of plain training).
"""

from __future__ import annotations

import math
from typing import Iterator, List, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

__all__ = ["class_pair_kd", "class_pair_order", "ClassPairIndexSampler"]


def class_pair_kd(logits: torch.Tensor, temperature: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """The CS-KD term for a batch laid out as (anchor, partner) pairs; mean over pairs, float32.

    Args:
        logits: (N, C) with N even; rows 0, 2, 4, ... are anchors, 1, 3, 5, ... their partners.
        temperature: Softmax temperature (authors: 4).
        target: Optional class indices (N,): checked to pair equal classes, which catches a
            data loader that does not use the class-pair sampler.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, num_classes), got shape {tuple(logits.shape)}.")
    n = logits.shape[0]
    if n % 2:
        raise ValueError(
            f"CS-KD needs an even batch of (sample, same-class partner) pairs, got {n} samples: use the class-pair "
            "sampler (MMPretrain: sampler=dict(type='ClassPairSampler'); timm: --cs-kd) with an even batch size."
        )
    if temperature <= 0:
        raise ValueError(f"cskd temperature must be > 0, got {temperature}.")
    if target is not None and target.dim() == 1 and not torch.equal(target[0::2], target[1::2]):
        raise ValueError(
            "CS-KD: the batch is not made of same-class pairs (labels at positions 2i and 2i+1 differ): the data "
            "loader must use the class-pair sampler (MMPretrain: sampler=dict(type='ClassPairSampler'); timm: --cs-kd)."
        )
    z = logits.float() / temperature
    log_p_anchor = F.log_softmax(z[0::2], dim=1)
    log_p_partner = F.log_softmax(z[1::2].detach(), dim=1)
    kl = F.kl_div(log_p_anchor, log_p_partner, reduction="batchmean", log_target=True)
    return kl * temperature**2


def class_pair_order(labels: Sequence[int], generator: torch.Generator) -> List[int]:
    """Dataset indices as (anchor, same-class partner) pairs, ``len(labels)`` indices in all (rounded up to even).

    Anchors are a random permutation of the data set's first ``ceil(N / 2)``
    positions of a shuffled order; each partner is drawn uniformly among the
    other samples of the anchor's class (the anchor itself when it is alone).
    """
    n = len(labels)
    if n == 0:
        raise ValueError("the class-pair sampler got an empty data set.")
    by_class: dict = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    order = torch.randperm(n, generator=generator).tolist()
    out: List[int] = []
    for anchor in order[: (n + 1) // 2]:
        members = by_class[int(labels[anchor])]
        if len(members) == 1:
            partner = anchor
        else:
            j = int(torch.randint(len(members) - 1, (1,), generator=generator))
            partner = members[j] if members[j] != anchor else members[-1]
        out += [anchor, partner]
    return out


class ClassPairIndexSampler(Sampler):
    """Dataset indices as (anchor, same-class partner) pairs, for CS-KD; one shard per process.

    Every epoch (:meth:`set_epoch`) draws a new order seeded by ``seed + epoch``,
    the same on every process, with about ``len(labels) / 2`` anchors, so an
    epoch has as many images as plain shuffling. Pairs are dealt to the
    ``world_size`` processes in turn (padded by repeating pairs so each gets the
    same number). Use an even batch size, so pairs stay within a batch.

    Args:
        labels: The class of every training sample, in data-set order.
        rank: This process's rank.
        world_size: Number of processes.
        seed: Random seed, the same on every process.
    """

    def __init__(self, labels: Sequence[int], rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}.")
        self.labels = [int(c) for c in labels]
        if not self.labels:
            raise ValueError("the class-pair sampler got an empty data set.")
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.epoch = 0
        self.pairs_per_rank = math.ceil(((len(self.labels) + 1) // 2) / world_size)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = class_pair_order(self.labels, g)
        pairs = [order[i : i + 2] for i in range(0, len(order), 2)]
        total = self.pairs_per_rank * self.world_size
        pairs = (pairs * math.ceil(total / len(pairs)))[:total]
        return iter([i for pair in pairs[self.rank : total : self.world_size] for i in pair])

    def __len__(self) -> int:
        return 2 * self.pairs_per_rank

    def set_epoch(self, epoch: int) -> None:
        """A new order every epoch."""
        self.epoch = epoch
