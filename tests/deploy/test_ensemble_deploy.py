"""The calibrated ensemble through the deploy API: fitted by calibrate, saved with the policy, used by the model."""

from __future__ import annotations

import pytest
import torch
from deploy_toy import all_exit_logits, toy
from test_calibrate import _synthetic

from sd_plugin.core import ensemble_logits
from sd_plugin.deploy import EnsembleModel, ExitPolicy, calibrate


def test_calibrate_fits_and_saves_the_ensemble_weights(tmp_path):
    data = _synthetic(n=1000)
    policy = calibrate(data, max_drop=5.0, method="empirical")
    assert policy.ensemble_weights is not None and len(policy.ensemble_weights) == 3
    assert policy.info["ensemble"]["chosen"] in ("fitted", "deepest")
    policy.save(tmp_path / "p.json")
    again = ExitPolicy.load(tmp_path / "p.json")
    assert again.ensemble_weights == policy.ensemble_weights
    # the calibrated ensemble is no worse than the deepest on the data it was fitted on
    top1 = lambda z: float((z.argmax(-1) == data.targets).float().mean())  # noqa: E731
    assert top1(ensemble_logits(data.logits, policy.ensemble_weights)) >= top1(data.logits[-1])


@torch.no_grad()
def test_ensemble_model_gives_the_weighted_logits():
    model, x = toy().eval(), torch.randn(4, 3, 16, 16)
    z = torch.stack(all_exit_logits(model, x))
    w = [0.2, 0.0, 0.8]
    torch.testing.assert_close(EnsembleModel(model, w)(x), (0.2 * z[0] + 0.8 * z[2]).log_softmax(dim=1))
    torch.testing.assert_close(EnsembleModel(model)(x), z.mean(dim=0).log_softmax(dim=1))  # BYOT's by default
    policy = ExitPolicy([None, None], ensemble_weights=w)
    torch.testing.assert_close(EnsembleModel(model, policy)(x), EnsembleModel(model, w)(x))


def test_policy_and_model_refuse_bad_weights():
    with pytest.raises(ValueError, match="one number per classifier"):
        ExitPolicy([0.9, 0.9], ensemble_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        ExitPolicy([0.9], ensemble_weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match="no ensemble_weights"):
        EnsembleModel(toy(), ExitPolicy([None, None]))
    with pytest.raises(ValueError, match="3 classifiers"):
        EnsembleModel(toy(), [1.0, 1.0])
