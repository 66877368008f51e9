"""Teacher-free regularisers that compose with the exits or work alone (maths in plain torch).

One concept per module: :mod:`.pskd` (progressive self-knowledge distillation,
past predictions per sample), :mod:`.cskd` (class-wise self-knowledge
distillation, same-class pairs in the batch), :mod:`.tfkd` (teacher-free KD with
a hand-made teacher distribution), :mod:`.zipf` (Zipf's label smoothing: soft
labels over the non-target classes from the model's own ranking).
"""

from .cskd import ClassPairIndexSampler, class_pair_kd, class_pair_order
from .pskd import PastPredictions, pskd_alpha_at, pskd_term
from .tfkd import tfkd_reg_term, tfkd_teacher
from .zipf import zipf_ranks, zipf_soft_labels, zipf_term

__all__ = [
    "PastPredictions",
    "pskd_alpha_at",
    "pskd_term",
    "ClassPairIndexSampler",
    "class_pair_kd",
    "class_pair_order",
    "tfkd_reg_term",
    "tfkd_teacher",
    "zipf_ranks",
    "zipf_soft_labels",
    "zipf_term",
]
