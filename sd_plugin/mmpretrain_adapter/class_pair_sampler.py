"""``ClassPairSampler``: batches of (sample, same-class partner) pairs for CS-KD, as an MMPretrain data sampler."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from mmengine.dist import get_dist_info, sync_random_seed

from sd_plugin.core.methods import ClassPairIndexSampler

from ..registry import DATA_SAMPLERS

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
class ClassPairSampler(ClassPairIndexSampler):
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
        rank, world_size = get_dist_info()
        super().__init__(_labels_of(dataset), rank, world_size, sync_random_seed() if seed is None else seed)
        self.dataset = dataset
