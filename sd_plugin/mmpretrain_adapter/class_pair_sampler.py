"""``ClassPairSampler``: batches of (sample, same-class partner) pairs for CS-KD."""

from __future__ import annotations

import math
from typing import Any, Iterator, List, Optional, Sequence

import torch
from mmengine.dist import get_dist_info, sync_random_seed
from mmpretrain.registry import DATA_SAMPLERS
from torch.utils.data import Sampler

from sd_plugin.core.methods import class_pair_order

__all__ = ["ClassPairSampler"]


def _labels_of(dataset: Any) -> Sequence[int]:
    getter = getattr(dataset, "get_gt_labels", None)
    if getter is not None:
        return [int(v) for v in getter()]
    cat_ids = getattr(dataset, "get_cat_ids", None)
    if cat_ids is None:
        raise TypeError(
            f"ClassPairSampler needs the data set's labels (get_gt_labels() or get_cat_ids(i)); "
            f"{type(dataset).__name__} has neither."
        )
    return [int(cat_ids(i)[0]) for i in range(len(dataset))]


@DATA_SAMPLERS.register_module()
class ClassPairSampler(Sampler):
    """Yields dataset indices as (anchor, partner) pairs of the same class, for CS-KD (``cskd_weight > 0``).

    Every epoch draws a new random order (seeded by ``seed`` and the epoch, the
    same on every process) of about ``len(dataset) / 2`` anchors, each followed
    by a random other sample of its class: one epoch has as many images as with
    ``DefaultSampler``. Under distributed training the pairs are split between
    processes (padded by repeating pairs so each gets the same number). The
    training batch size must be even, so pairs stay within a batch.

    Args:
        dataset: The training data set (an mmpretrain dataset with ``get_gt_labels``).
        seed: Random seed (default: a seed shared by all processes).

    Example:
        >>> train_dataloader = dict(batch_size=64, sampler=dict(type='ClassPairSampler'), ...)
    """

    def __init__(self, dataset: Any, seed: Optional[int] = None) -> None:
        self.dataset = dataset
        self.labels = _labels_of(dataset)
        self.rank, self.world_size = get_dist_info()
        self.seed = sync_random_seed() if seed is None else seed
        self.epoch = 0
        pairs = (len(self.labels) + 1) // 2
        self.pairs_per_rank = math.ceil(pairs / self.world_size)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = class_pair_order(self.labels, g)
        pairs: List[List[int]] = [order[i : i + 2] for i in range(0, len(order), 2)]
        total = self.pairs_per_rank * self.world_size
        pairs = (pairs * math.ceil(total / len(pairs)))[:total]
        mine = pairs[self.rank : total : self.world_size]
        return iter([i for pair in mine for i in pair])

    def __len__(self) -> int:
        return 2 * self.pairs_per_rank

    def set_epoch(self, epoch: int) -> None:
        """A new order every epoch (called by mmengine's training loop)."""
        self.epoch = epoch
