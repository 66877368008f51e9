"""``sd_plugin._checks``: the per-batch checks the adapters call in training."""

from __future__ import annotations

import pytest
import torch

from sd_plugin._checks import check_class_labels, check_finite_input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_the_samples(bad):
    x = torch.randn(4, 3, 8, 8)
    x[2, 1, 0, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or inf values \(sample\(s\) \[2\] of 4\)"):
        check_finite_input(x)


def test_finite_inputs_pass_even_when_their_sum_overflows():
    check_finite_input(torch.full((4, 3, 8, 8), 3e38))  # sum is inf in float32, every value is finite
    check_finite_input(torch.randn(2, 3, 4, 4).bfloat16())
    check_finite_input(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))  # raw images: nothing to check


def test_labels_out_of_range():
    check_class_labels(torch.tensor([0, 4]), 5)
    check_class_labels(torch.rand(2, 5), 5)  # soft targets (Mixup/CutMix) are not labels
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\] for 5 classes, got min 0 and max 5"):
        check_class_labels(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match=r"got min -1"):
        check_class_labels(torch.tensor([-1, 2]), 5)
