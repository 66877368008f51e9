"""The ensemble's ``mode='tensor'`` output (log of the mean softmax) stays finite on both routes."""

from __future__ import annotations

import pytest
import torch
from _rel_helpers import sd_resnet


@pytest.mark.mmpretrain
def test_mmpretrain_ensemble_log_probs_have_no_minus_infinity():
    from mmpretrain.registry import MODELS

    import sd_plugin  # noqa: F401  (registers SelfDistillClassifier)

    torch.manual_seed(0)
    model = MODELS.build(dict(sd_resnet(num_classes=3), predict_exit="ensemble")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("fc.weight"):  # every classifier: logits ~1e4 apart, softmax underflows to exact 0
                p.mul_(1e5)
        x = torch.randn(2, 3, 32, 32)
        probs = model._forward_all(x)[1].ensemble_probs()
        out = model(x, mode="tensor")
    assert (probs == 0).any()  # without the clamp, log(0) = -inf here
    assert torch.isfinite(out).all()
    assert torch.equal(out.argmax(dim=1), probs.argmax(dim=1))
