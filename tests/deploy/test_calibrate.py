import pytest
import torch
from deploy_toy import all_exit_logits, toy

from sd_plugin.deploy import EarlyExitModel, ExitLogits, ExitPolicy, calibrate, collect_exit_logits, evaluate_policy


def _synthetic(n: int = 400, seed: int = 0) -> ExitLogits:
    """Three classifiers of rising accuracy whose confidence tracks correctness (like trained exits)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 10, (n,), generator=g)
    logits = []
    for skill in (0.5, 0.7, 0.85):
        right = torch.rand(n, generator=g) < skill
        guess = torch.where(right, targets, torch.randint(0, 10, (n,), generator=g))
        margin = torch.where(right, 1.0 + 3.0 * torch.rand(n, generator=g), 2.0 * torch.rand(n, generator=g))
        lg = torch.randn(n, 10, generator=g) * 0.3
        lg[torch.arange(n), guess] += margin
        logits.append(lg)
    return ExitLogits(torch.stack(logits), targets)


def test_collect_matches_each_exit():
    model = toy()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    data = collect_exit_logits(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert data.logits.shape == (3, 6, 5) and torch.equal(data.targets, y)
    with torch.no_grad():
        torch.testing.assert_close(data.logits, torch.stack(all_exit_logits(model, x)))


@pytest.mark.parametrize("max_drop", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("criterion", ["max_prob", "margin", "entropy"])
def test_max_drop_is_met_on_calibration_set(max_drop, criterion):
    data = _synthetic()
    policy = calibrate(data, max_drop=max_drop, criterion=criterion, method="empirical")
    stats = evaluate_policy(data, policy)
    assert stats["drop"] <= max_drop + 1e-9
    assert policy.info["calibration"]["drop"] == pytest.approx(stats["drop"])
    if max_drop >= 1.0:  # some samples leave early: cheaper than the deepest exit
        assert stats["cost"] < 1.0


@pytest.mark.parametrize("method, n", [("empirical", 400), ("guaranteed", 4000)])
def test_looser_target_is_never_more_expensive(method, n):
    data = _synthetic(n)
    costs = [1.0, 2.0, 3.0]
    drops = (1.0, 2.0, 5.0)
    cost = [
        evaluate_policy(data, calibrate(data, max_drop=d, costs=costs, method=method), costs)["cost"] for d in drops
    ]
    assert cost[0] >= cost[1] >= cost[2]
    assert cost[2] < cost[0]  # the looser targets are used


@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_budget_is_met_on_calibration_set(budget):
    data = _synthetic()
    costs = [0.3, 0.6, 1.0]
    policy = calibrate(data, budget=budget, costs=costs, method="empirical")
    stats = evaluate_policy(data, policy, costs)
    assert stats["cost"] <= budget + 1e-9
    # The search uses the budget: better than answering everything at the first exit.
    assert stats["top1"] > float(data.top1()[0])


def test_bad_targets():
    data = _synthetic()
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate(data)
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate(data, max_drop=1.0, budget=0.5, costs=[1, 2, 3])
    with pytest.raises(ValueError, match="needs costs"):
        calibrate(data, budget=0.5)
    with pytest.raises(ValueError, match="below the cost"):
        calibrate(data, budget=0.2, costs=[1, 2, 3])
    with pytest.raises(ValueError, match="one value per exit"):
        calibrate(data, max_drop=1.0, costs=[1, 2])


def test_policy_file_round_trip_and_reuse(tmp_path):
    data = _synthetic()
    policy = calibrate(data, max_drop=2.0)
    policy.save(tmp_path / "policy.json")
    loaded = ExitPolicy.load(tmp_path / "policy.json")
    assert loaded == policy
    assert torch.equal(loaded.exits(data.logits), policy.exits(data.logits))
    with pytest.raises(ValueError, match="not an exit policy"):
        (tmp_path / "x.json").write_text("{}")
        ExitPolicy.load(tmp_path / "x.json")


@torch.no_grad()
def test_simulated_decisions_match_the_early_exit_model():
    model = toy(seed=2)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    data = collect_exit_logits(model, [(x, y)])
    policy = calibrate(data, max_drop=50.0, method="empirical")  # 16 images: fitted, so that many exit early
    out = EarlyExitModel(model, policy).eval()(x)
    assert torch.equal(out.exit, policy.exits(data.logits))
