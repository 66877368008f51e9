"""Plain-Python softmax and KL divergence for the hand-computed checks of the methods' maths."""

import math
from typing import List, Sequence


def softmax(xs: Sequence[float]) -> List[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q), summed over classes."""
    return sum(a * math.log(a / b) for a, b in zip(p, q))
