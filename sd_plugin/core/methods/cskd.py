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

from typing import List, Sequence

import torch
import torch.nn.functional as F

__all__ = ["class_pair_kd", "class_pair_order"]


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
