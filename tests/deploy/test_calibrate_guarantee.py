"""calibrate(method='guaranteed'): the target holds on unseen data with probability >= 1 - delta.

The simulations draw many calibration sets from one fixed pool of synthetic logits and measure each calibrated
policy on the rest of the pool. A guarantee that holds may fail in at most a delta share of the draws, up to the
binomial noise of a finite number of draws (``_allowed_failures``); today's empirical calibration fails far more
often on the same draws. (Each draw is without replacement and its complement is the new data, so the pool plays
the distribution; the complement's mean moves against the draw's by 1/19 of its deviation, negligible here.)
"""

import math
import re

import pytest
import torch

from sd_plugin.deploy import ExitLogits, ExitPolicy, _risk, calibrate, evaluate_policy
from sd_plugin.deploy.policy import confidence_scores, exit_decisions

POOL = 20_000
CAL = 1_000  # calibration samples per draw
SPLITS = 200
DELTA = 0.1
MAX_DROP = 1.0  # top-1 points
BUDGET = 0.7  # average cost, costs below
COSTS = [0.25, 0.5, 0.75, 1.0]
CANDIDATES = 21  # threshold quantiles per exit (fewer than the default: keeps the simulations fast)
FALSE_ALARM = 1e-3  # chance that a valid guarantee still fails the test, by the binomial noise of SPLITS draws


def _pool(n: int = POOL, classes: int = 10, seed: int = 0) -> ExitLogits:
    """Three exits and the deepest classifier of rising skill; a latent difficulty per sample drives both who is
    right and how confident it is, with noise, so confidence is informative but imperfect and an exit is sometimes
    right where the deepest is wrong (as with trained exits)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)
    logits = []
    for skill in (0.55, 0.7, 0.8, 0.88):
        right = difficulty + 0.05 * torch.randn(n, generator=g) < skill
        wrong = (targets + torch.randint(1, classes, (n,), generator=g)) % classes
        margin = 1.0 + 4.0 * (skill - difficulty).clamp(min=-0.3) + 0.8 * torch.randn(n, generator=g)
        lg = 0.5 * torch.randn(n, classes, generator=g)
        lg[torch.arange(n), torch.where(right, targets, wrong)] += margin.clamp(min=0)
        logits.append(lg)
    return ExitLogits(torch.stack(logits), targets)


def _allowed_failures(splits: int, delta: float) -> int:
    """Largest failure count that Binomial(splits, delta) exceeds with probability <= FALSE_ALARM."""
    tail, k = 1.0, 0
    while True:
        tail -= math.comb(splits, k) * delta**k * (1 - delta) ** (splits - k)
        if tail <= FALSE_ALARM:
            return k
        k += 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only fight over the shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool():
    data = _pool()
    return data, confidence_scores(data.logits[:-1]), (data.logits.argmax(-1) == data.targets).double()


def _simulate(pool, method: str, splits: int = SPLITS, **target) -> dict:
    """Failures (test drop above max_drop, or test cost above budget) over ``splits`` calibration draws."""
    data, scores, correct = pool
    costs = torch.tensor(COSTS, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    failures, values = 0, []
    for _ in range(splits):
        perm = torch.randperm(POOL, generator=g)
        cal, rest = perm[:CAL], perm[CAL:]
        policy = calibrate(
            ExitLogits(data.logits[:, cal], data.targets[cal]),
            costs=COSTS,
            method=method,
            delta=DELTA,
            num_candidates=CANDIDATES,
            **target,
        )
        idx = exit_decisions(scores[:, rest], policy.bounds())
        if "max_drop" in target:
            value = float(correct[-1, rest].mean() - correct[idx, rest].mean()) * 100
            failures += value > target["max_drop"]
        else:
            value = float(costs[idx].mean())
            failures += value > target["budget"]
        values.append(value)
    return {"failures": failures, "mean": sum(values) / len(values)}


@pytest.mark.parametrize("target", [{"max_drop": MAX_DROP}, {"budget": BUDGET}], ids=["max_drop", "budget"])
def test_guarantee_holds_on_unseen_data_and_empirical_does_not(pool, target):
    allowed = _allowed_failures(SPLITS, DELTA)
    guaranteed = _simulate(pool, "guaranteed", **target)
    empirical = _simulate(pool, "empirical", **target)
    assert guaranteed["failures"] <= allowed, (guaranteed, allowed)
    # today's calibration, fitted to each calibration set, breaks the same promise on the same draws
    assert empirical["failures"] > allowed, (empirical, allowed)


def test_simulation_catches_a_guarantee_switched_off(pool, monkeypatch):
    """Bounding the drop by its calibration-set value (no confidence margin) must fail the simulation."""

    def empirical_mean(lost, gained, n, delta):
        return (lost - gained).double() / n

    monkeypatch.setattr(_risk, "drop_upper_bound", empirical_mean)
    splits = SPLITS // 2
    assert _simulate(pool, "guaranteed", splits, max_drop=MAX_DROP)["failures"] > _allowed_failures(splits, DELTA)


def test_clopper_pearson_matches_hand_computed_values():
    # 1 event in 10 at 95%: the largest p with (1 - p)^10 + 10 p (1 - p)^9 >= 0.05, by hand 0.39416.
    upper = float(_risk.clopper_pearson_upper(torch.tensor(1), 10, 0.05))
    assert upper == pytest.approx(0.394163, abs=1e-6)
    assert (1 - upper) ** 10 + 10 * upper * (1 - upper) ** 9 == pytest.approx(0.05, abs=1e-9)
    # no event in n: 1 - delta^(1/n); the lower bound mirrors the upper one (k -> n - k, p -> 1 - p)
    assert float(_risk.clopper_pearson_upper(torch.tensor(0), 200, 0.1)) == pytest.approx(1 - 0.1 ** (1 / 200))
    lower = _risk.clopper_pearson_lower(torch.tensor([0, 3, 9]), 10, 0.05)
    mirrored = 1 - _risk.clopper_pearson_upper(torch.tensor([10, 7, 1]), 10, 0.05)
    torch.testing.assert_close(lower, mirrored, atol=1e-9, rtol=0)
    # Hoeffding-Bentkus is valid for any [0, 1] loss, so never tighter than the exact binomial bound
    assert float(_risk.hoeffding_bentkus_upper(torch.tensor(0.1), 10, 0.05)) >= upper


def test_infeasible_target_names_what_the_data_supports(pool):
    data = ExitLogits(pool[0].logits[:, :300], pool[0].targets[:300])
    with pytest.raises(ValueError, match="cannot certify") as err:
        calibrate(data, max_drop=0.5)
    smallest, needed = re.search(
        r"certifies is about ([0-9.]+).*at least about ([0-9]+) calibration", str(err.value)
    ).groups()
    assert float(smallest) > 0.5 and int(needed) > 300
    with pytest.raises(ValueError, match="cannot certify"):
        calibrate(data, max_drop=0.0)  # no finite sample certifies a zero drop with early exits
    with pytest.raises(ValueError, match=r"smallest budget this data certifies is about"):
        calibrate(data, budget=COSTS[0] + 1e-3, costs=COSTS)
    calibrate(data, max_drop=0.5, method="empirical")  # fitted to the data: no such limit
    with pytest.raises(ValueError, match="too few"):
        calibrate(ExitLogits(data.logits[:, :1], data.targets[:1]), max_drop=5.0)


def test_guaranteed_is_the_default_and_info_round_trips(pool, tmp_path):
    data = ExitLogits(pool[0].logits[:, :3000], pool[0].targets[:3000])
    policy = calibrate(data, max_drop=MAX_DROP, costs=COSTS)
    info = policy.info
    assert info["method"] == "guaranteed" and info["delta"] == 0.1 and info["target"] == {"max_drop": MAX_DROP}
    g = info["guarantee"]
    assert g["risk"] == "drop" and g["confidence"] == pytest.approx(0.9)
    assert g["bound"] <= MAX_DROP and g["num_path_samples"] + g["num_test_samples"] == 3000
    assert info["calibration"]["num_samples"] == 3000
    assert info["calibration"]["drop"] == pytest.approx(evaluate_policy(data, policy, COSTS)["drop"])
    assert info["calibration"]["cost"] < 1.0  # some samples leave early
    policy.save(tmp_path / "policy.json")
    assert ExitPolicy.load(tmp_path / "policy.json") == policy
    # the guarantee costs compute: the empirical policy is at most as expensive on the calibration set
    empirical = calibrate(data, max_drop=MAX_DROP, costs=COSTS, method="empirical")
    assert empirical.info["method"] == "empirical" and "guarantee" not in empirical.info
    assert empirical.info["calibration"]["cost"] <= info["calibration"]["cost"]


def test_budget_guarantee_info_and_entropy(pool):
    data = ExitLogits(pool[0].logits[:, :3000], pool[0].targets[:3000])
    policy = calibrate(data, budget=BUDGET, costs=COSTS, criterion="entropy", delta=0.05)
    g = policy.info["guarantee"]
    assert policy.criterion == "entropy" and g["risk"] == "cost" and g["confidence"] == pytest.approx(0.95)
    assert policy.info["calibration"]["cost"] <= g["bound"] <= BUDGET


def test_bad_method_and_delta(pool):
    data = ExitLogits(pool[0].logits[:, :500], pool[0].targets[:500])
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(data, max_drop=1.0, method="conformal")
    for delta in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="delta"):
            calibrate(data, max_drop=1.0, delta=delta)
