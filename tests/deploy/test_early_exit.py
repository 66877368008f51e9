import pytest
import torch
from deploy_toy import all_exit_logits, toy

from sd_plugin.deploy import EarlyExitModel, ExitPolicy


def _stage_calls(model):
    return [list(stage.calls) for stage in model.net.stages]


@torch.no_grad()
def test_threshold_zero_answers_everything_at_first_exit():
    model, x = toy(), torch.randn(5, 3, 16, 16)
    ref = all_exit_logits(model, x)
    model.reset_calls()
    out = EarlyExitModel(model, [0.0, 0.0]).eval()(x)
    assert out.exit.tolist() == [1] * 5
    torch.testing.assert_close(out.logits, ref[0])
    assert _stage_calls(model) == [[5], [], []]  # stages 2 and 3 never ran
    assert out.samples_per_stage == [5, 0, 0] and out.stages_run == 1


@torch.no_grad()
@pytest.mark.parametrize("thresholds", [[1.01, 1.01], [None, None]])
def test_unreachable_thresholds_give_deepest(thresholds):
    model, x = toy(), torch.randn(4, 3, 16, 16)
    ref = model.forward_deepest(x)
    model.reset_calls()
    out = EarlyExitModel(model, thresholds).eval()(x)
    assert torch.equal(out.logits, ref)
    assert out.exit.tolist() == [3] * 4
    assert _stage_calls(model) == [[4], [4], [4]]
    assert out.samples_per_stage == [4, 4, 4]


@torch.no_grad()
@pytest.mark.parametrize("criterion", ["max_prob", "margin", "entropy"])
def test_mixed_batch_each_sample_from_its_exit(criterion):
    model, x = toy(seed=1), torch.randn(12, 3, 16, 16)
    ref = torch.stack(all_exit_logits(model, x))
    probs = ref.softmax(-1)
    top2 = probs.sort(-1, descending=True).values[..., :2]  # by hand: the top probability and the runner-up
    conf = {
        "max_prob": top2[..., 0],
        "margin": top2[..., 0] - top2[..., 1],
        "entropy": -(probs * probs.log()).sum(-1),
    }[criterion]
    # Median thresholds: about half the samples leave at each exit.
    thresholds = [float(conf[0].quantile(0.5)), float(conf[1].quantile(0.5))]
    model.reset_calls()
    out = EarlyExitModel(model, thresholds, criterion=criterion).eval()(x)
    passes = (
        conf[:2] >= torch.tensor(thresholds)[:, None]
        if criterion != "entropy"
        else conf[:2] <= torch.tensor(thresholds)[:, None]
    )
    expected = torch.where(passes[0], 0, torch.where(passes[1], 1, 2))
    assert torch.equal(out.exit, expected + 1)
    assert 0 < int((expected == 0).sum()) < 12
    torch.testing.assert_close(out.logits, ref[expected, torch.arange(12)], rtol=1e-5, atol=1e-5)
    # Observed by the stages themselves: later stages see only the samples still unanswered.
    n0 = 12 - int((expected == 0).sum())
    n1 = n0 - int((expected == 1).sum())
    calls = _stage_calls(model)
    assert calls[0] == [12] and calls[1] == ([n0] if n0 else []) and calls[2] == ([n1] if n1 else [])
    assert out.samples_per_stage == [12, n0, n1]


def test_bad_inputs():
    model = toy()
    with pytest.raises(ValueError, match="2 exits"):
        EarlyExitModel(model, [0.5])
    with pytest.raises(ValueError, match="criterion"):
        EarlyExitModel(model, [0.5, 0.5], criterion="top5")
    with pytest.raises(TypeError, match="MultiExitModel"):
        EarlyExitModel(torch.nn.Linear(2, 2), [0.5])
    with pytest.raises(RuntimeError, match="eval"):
        EarlyExitModel(model, [0.5, 0.5]).train()(torch.randn(2, 3, 16, 16))


def test_thresholds_travel_with_state_dict():
    model = toy()
    ee = EarlyExitModel(model, ExitPolicy([0.7, None], criterion="entropy"))
    other = EarlyExitModel(toy(), [0.1, 0.2])
    other.load_state_dict(ee.state_dict())
    assert other.criterion == "entropy"
    assert other.policy.thresholds == [0.7, None]
    assert torch.equal(other.model.net.fc.weight, model.net.fc.weight)
    # The wrapped model's own state dict is unchanged (no extra keys inside it).
    assert set(model.state_dict()) == {k[len("model.") :] for k in ee.state_dict() if k.startswith("model.")}


@torch.no_grad()
def test_point_that_cannot_shrink_keeps_the_batch_and_gives_the_same_answers():
    import dataclasses

    from sd_plugin.core.engine import ExitEngine

    model, x = toy(seed=1), torch.randn(12, 3, 16, 16)
    conf = torch.stack(all_exit_logits(model, x)).softmax(-1).max(-1).values
    thresholds = [float(conf[0].quantile(0.5)), float(conf[1].quantile(0.5))]
    want = EarlyExitModel(model, thresholds).eval()(x)
    model.exit_engine.remove()
    model.points = [model.points[0], dataclasses.replace(model.points[1], shrinkable=False)]
    model.exit_engine = ExitEngine(model.net, model.points)
    model.reset_calls()
    got = EarlyExitModel(model, thresholds).eval()(x)
    assert torch.equal(got.exit, want.exit) and torch.equal(got.logits, want.logits)
    assert got.samples_per_stage == want.samples_per_stage
    n0 = want.samples_per_stage[1]
    assert 0 < want.samples_per_stage[2] < n0 < 12
    # Stage 2 still ran on every sample that reached exit 2 (the model needs its whole batch after that point).
    assert _stage_calls(model) == [[12], [n0], [n0]]
