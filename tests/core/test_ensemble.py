"""The ensemble: BYOT's equal-weight mean of logits, and weights fitted on held-out data (hand-computed cases)."""

from __future__ import annotations

import pytest
import torch

from sd_plugin.core import SelfDistillOutput, ensemble_logits, fit_ensemble_weights


def test_weighted_ensemble_by_hand():
    exit1 = torch.tensor([[2.0, 0.0]])
    deepest = torch.tensor([[0.0, 1.0]])
    # 0.25 * [2, 0] + 0.75 * [0, 1] = [0.5, 0.75]; log-softmax of that
    want = torch.tensor([[0.5, 0.75]]).log_softmax(dim=1)
    torch.testing.assert_close(ensemble_logits([exit1, deepest], [0.25, 0.75]), want)
    # equal weights: the mean [1.0, 0.5], as BYOT's sum(outputs) / len(outputs)
    torch.testing.assert_close(ensemble_logits([exit1, deepest]), torch.tensor([[1.0, 0.5]]).log_softmax(dim=1))
    # multi-label heads get the weighted logits themselves
    torch.testing.assert_close(
        ensemble_logits([exit1, deepest], [0.25, 0.75], multi_label=True), torch.tensor([[0.5, 0.75]])
    )


def test_output_and_log_probabilities_give_the_same_ensemble():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=g) for _ in range(3)]
    out = SelfDistillOutput(logits[-1], torch.zeros(5, 2), logits[:-1], [torch.zeros(5, 2)] * 2)
    w = [0.1, 0.3, 0.6]
    from_logp = ensemble_logits([z.log_softmax(dim=1) for z in logits], w)  # what MultiExitAccuracy sees
    torch.testing.assert_close(out.ensemble_logits(w), from_logp)
    torch.testing.assert_close(out.ensemble_probs(w), from_logp.exp())


def test_bad_weights_are_refused():
    z = torch.zeros(2, 3, 4)
    for bad, match in (([1.0], "2 classifiers"), ([-1.0, 2.0], "non-negative"), ([0.0, 0.0], "not all zero")):
        with pytest.raises(ValueError, match=match):
            ensemble_logits(z, bad)


def _pool(n: int, exit_noise: float, seed: int = 0):
    """Two classes; the deepest classifier sees the label through noise 1.0, exit1 through ``exit_noise``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float()
    deepest = torch.stack([-sign, sign], 1) + 1.0 * torch.randn(n, 2, generator=g)
    exit1 = torch.stack([-sign, sign], 1) + exit_noise * torch.randn(n, 2, generator=g)
    return torch.stack([exit1, deepest]), y


def test_a_useless_exit_gets_the_deepest_alone():
    """exit1 is pure noise: equal weights lose to the deepest; the fit keeps (about) the deepest alone."""
    z, y = _pool(4000, exit_noise=50.0)
    fit = fit_ensemble_weights(z, y)
    assert fit.cv_top1["equal"] < fit.cv_top1["deepest"] - 5
    deep_top1 = float((z[1].argmax(1) == y).float().mean()) * 100
    top1 = float((ensemble_logits(z, fit.weights).argmax(1) == y).float().mean()) * 100
    assert top1 >= deep_top1 - 0.5
    assert fit.weights[0] < 0.05 * fit.weights[1]


def test_an_independent_equally_good_exit_is_used():
    """exit1 as good as the deepest, independent noise: averaging helps, the fit weighs both about equally."""
    z, y = _pool(4000, exit_noise=1.0, seed=1)
    fit = fit_ensemble_weights(z, y)
    assert fit.chosen == "fitted" and fit.cv_top1["fitted"] > fit.cv_top1["deepest"] + 2
    assert 0.7 < fit.weights[0] / fit.weights[1] < 1.4


def test_fitted_weights_that_lose_in_cross_validation_fall_back_to_the_deepest(monkeypatch):
    """When the fitted weights lose to the deepest in cross-validation, the deepest alone is used."""
    import sd_plugin.core.ensemble as ens

    z, y = _pool(400, exit_noise=3.0, seed=2)
    monkeypatch.setattr(ens, "_fit", lambda z_, y_: torch.tensor([1.0, 0.0]))  # exit1 alone: worse than deepest
    fit = fit_ensemble_weights(z, y)
    assert fit.chosen == "deepest" and fit.weights == [0.0, 1.0] and fit.fitted == [1.0, 0.0]


def test_fit_input_errors():
    z, y = _pool(10, exit_noise=1.0)
    with pytest.raises(ValueError, match="targets"):
        fit_ensemble_weights(z, y[:5])
    with pytest.raises(ValueError, match="folds"):
        fit_ensemble_weights(z, y, folds=1)


def test_sign_test_p_value_matches_hand_computed_values():
    from sd_plugin.core.ensemble import sign_test_p_value

    assert sign_test_p_value(3, 0) == 1 / 8  # all 3 disagreements won: (1/2)^3
    assert sign_test_p_value(4, 1) == (1 + 5) / 32  # P(X >= 4), X ~ Bin(5, 1/2)
    assert sign_test_p_value(0, 0) == 1.0 and sign_test_p_value(0, 4) == 1.0


def test_a_gain_within_chance_keeps_the_deepest(monkeypatch):
    """Fitted weights right on 3 samples the deepest misses and wrong on 1 it gets: a higher cross-validated
    top-1 (32 / 40 against 30 / 40), but p = 5 / 16 for that split by chance, so the deepest alone is kept; at a
    level above that p the fitted weights are used."""
    import sd_plugin.core.ensemble as ens

    y = torch.zeros(40, dtype=torch.long)
    deepest_right = torch.arange(40) < 30
    exit1_right = deepest_right.clone()
    exit1_right[[0]] = False  # the one loss
    exit1_right[[30, 31, 32]] = True  # the three wins
    to_logits = lambda right: torch.stack([right.float(), (~right).float()], 1)  # noqa: E731  class 0 iff right
    z = torch.stack([to_logits(exit1_right), to_logits(deepest_right)])
    monkeypatch.setattr(ens, "_fit", lambda z_, y_: torch.tensor([1.0, 0.0]))  # the fit picks exit1 alone
    fit = fit_ensemble_weights(z, y)
    assert fit.cv_top1["fitted"] == pytest.approx(80.0) and fit.cv_top1["deepest"] == pytest.approx(75.0)
    assert fit.p_value == 5 / 16 and fit.chosen == "deepest" and fit.weights == [0.0, 1.0]
    assert fit_ensemble_weights(z, y, delta=0.4).chosen == "fitted"
    with pytest.raises(ValueError, match="delta"):
        fit_ensemble_weights(z, y, delta=1.0)
