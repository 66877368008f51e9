import math

import pytest
import torch

from sd_plugin.core import (
    SelfDistillConfig,
    SelfDistillLoss,
    SelfDistillOutput,
    feature_hint,
    kd_binary_kl,
    kd_kl_div,
    self_distill_losses,
    soft_cross_entropy,
)


def test_kd_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[0.5, 0.0, 2.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in s[0].tolist()]
    pt = [math.exp(v / T) for v in t[0].tolist()]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    expected = sum(b * math.log(b / a) for a, b in zip(ps, pt))
    assert kd_kl_div(s, t, T).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_when_exit_equals_teacher():
    x = torch.randn(4, 10)
    assert kd_kl_div(x.clone(), x, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_into_teacher():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    fs = torch.randn(4, 8, requires_grad=True)
    ft = torch.randn(4, 8, requires_grad=True)
    (kd_kl_div(s, t, 3.0) + feature_hint(fs, ft)).backward()
    assert t.grad is None and ft.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert fs.grad is not None and fs.grad.abs().sum() > 0


def test_binary_kd_matches_hand_computation():
    s = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]])
    t = torch.tensor([[0.5, 0.0, 2.0], [-1.0, 0.5, 4.0]])
    T = 2.0

    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v / T))

    rows = []
    for srow, trow in zip(s.tolist(), t.tolist()):
        rows.append(
            sum(
                sig(b) * math.log(sig(b) / sig(a)) + (1 - sig(b)) * math.log((1 - sig(b)) / (1 - sig(a)))
                for a, b in zip(srow, trow)
            )
        )
    assert kd_binary_kl(s, t, T).item() == pytest.approx(sum(rows) / 2, rel=1e-5)


def test_binary_kd_zero_at_teacher_finite_for_large_logits_and_teacher_detached():
    x = torch.randn(4, 6)
    assert kd_binary_kl(x.clone(), x, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([[200.0, -200.0]], requires_grad=True)
    t = torch.tensor([[-200.0, 200.0]], requires_grad=True)
    value = kd_binary_kl(s, t, 1.0)
    assert torch.isfinite(value) and value.item() == pytest.approx(400.0, rel=1e-4)  # 2 classes x 200 nats
    value.backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


def test_multi_label_output_distils_with_binary_kd_and_refuses_softmax_methods():
    torch.manual_seed(0)
    out = SelfDistillOutput(torch.randn(3, 4), torch.randn(3, 8), [torch.randn(3, 4)], [torch.randn(3, 8)], True)
    target = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
    config = SelfDistillConfig()
    terms = self_distill_losses(out, target, config, ce_fn=lambda z, y: z.sum() * 0)
    expected = config.kd_weight * kd_binary_kl(out.exit_logits[0], out.logits, config.temperature)
    torch.testing.assert_close(terms["exit1_loss_kd"], expected)
    torch.testing.assert_close(out.ensemble_probs(), ((out.logits + out.exit_logits[0]) / 2).sigmoid())
    with pytest.raises(ValueError, match="cskd_weight > 0.*multi-label"):
        self_distill_losses(out, target, SelfDistillConfig(cskd_weight=1.0), ce_fn=lambda z, y: z.sum() * 0)


def test_hint_hand_computed_and_shape_checked():
    fs = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    ft = torch.tensor([[0.0, 4.0], [0.0, 1.0]])
    assert feature_hint(fs, ft).item() == pytest.approx((5.0 + 1.0) / 2)  # default 'mean'
    assert feature_hint(fs, ft, "rms").item() == pytest.approx(((25.0 + 1.0) / 2) ** 0.5)
    with pytest.raises(ValueError, match="same shape"):
        feature_hint(torch.randn(4, 8), torch.randn(4, 8, 1, 1))


def test_soft_cross_entropy_hard_and_soft_targets_agree():
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    hard = soft_cross_entropy(logits, y)
    soft = soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 4).float())
    assert hard.item() == pytest.approx(soft.item(), rel=1e-6)
    manual = -torch.log_softmax(logits, 1)[torch.arange(6), y].mean()
    assert hard.item() == pytest.approx(manual.item(), rel=1e-6)
    smooth_hard = soft_cross_entropy(logits, y, label_smoothing=0.1)
    smooth_soft = soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 4).float(), label_smoothing=0.1)
    assert smooth_hard.item() == pytest.approx(smooth_soft.item(), rel=1e-5)


def test_labels_out_of_range_are_named():
    with pytest.raises(ValueError, match="labels must lie in"):
        soft_cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))


def _output(n=4, c=5, d=8, exits=2):
    return SelfDistillOutput(
        logits=torch.randn(n, c, requires_grad=True),
        features=torch.randn(n, d, requires_grad=True),
        exit_logits=[torch.randn(n, c, requires_grad=True) for _ in range(exits)],
        exit_features=[torch.randn(n, d, requires_grad=True) for _ in range(exits)],
    )


def test_terms_and_weights():
    out = _output()
    y = torch.randint(0, 5, (4,))
    cfg = SelfDistillConfig(temperature=2.0, ce_weight=0.5, kd_weight=0.25, hint_weight=0.1, deepest_weight=2.0)
    terms = self_distill_losses(out, y, cfg)
    assert set(terms) == {
        "loss_ce",
        "exit1_loss_ce",
        "exit1_loss_kd",
        "exit1_loss_hint",
        "exit2_loss_ce",
        "exit2_loss_kd",
        "exit2_loss_hint",
    }
    assert terms["loss_ce"].item() == pytest.approx(2.0 * soft_cross_entropy(out.logits, y).item(), rel=1e-6)
    assert terms["exit2_loss_kd"].item() == pytest.approx(
        0.25 * kd_kl_div(out.exit_logits[1], out.logits, 2.0).item(), rel=1e-6
    )
    assert terms["exit1_loss_hint"].item() == pytest.approx(
        0.1 * feature_hint(out.exit_features[0], out.features).item(), rel=1e-6
    )


def test_module_total_and_teacher_gradient_only_from_its_own_ce():
    out = _output()
    y = torch.randint(0, 5, (4,))
    crit = SelfDistillLoss(ce_weight=0.0, deepest_weight=0.0)
    crit(out, y).backward()
    # With the deepest CE off, nothing may reach the teacher's logits or features.
    for teacher in (out.logits, out.features):
        assert teacher.grad is None or not teacher.grad.any()
    assert all(lg.grad is not None for lg in out.exit_logits)
    total = SelfDistillLoss()(_output(), y)
    assert total.dim() == 0 and torch.isfinite(total)


def test_loss_rejects_plain_tensor():
    with pytest.raises(TypeError, match="SelfDistillOutput"):
        SelfDistillLoss()(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(temperature=0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature="3"), TypeError, "temperature"),
        (dict(kd_weight=-0.1), ValueError, "kd_weight"),
        (dict(hint_weight=float("nan")), ValueError, "hint_weight"),
        (dict(ce_weight="a"), TypeError, "ce_weight"),
        (dict(exit_indices=[1, 1]), ValueError, "duplicates"),
        (dict(exit_indices="0,1"), TypeError, "exit_indices"),
        (dict(exit_indices=[0.5]), TypeError, "ints"),
        (dict(predict_exit="last"), ValueError, "predict_exit"),
        (dict(predict_exit=0), ValueError, "1-based"),
        (dict(exit_hidden_ratio=0), ValueError, "exit_hidden_ratio"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        SelfDistillConfig(**kwargs)


def test_empty_exit_indices_mean_no_exits():
    assert SelfDistillConfig(exit_indices=[]).resolve_exit_indices(4, (0, 1, 2)) == ()


def test_resolve_exit_indices():
    cfg = SelfDistillConfig()
    assert cfg.resolve_exit_indices(4, (0, 1, 2)) == (0, 1, 2)
    assert SelfDistillConfig(exit_indices=[-2, 0]).resolve_exit_indices(4, ()) == (0, 2)
    with pytest.raises(ValueError, match="out of range"):
        SelfDistillConfig(exit_indices=[3]).resolve_exit_indices(4, ())
    with pytest.raises(ValueError, match="same position"):
        SelfDistillConfig(exit_indices=[0, -4]).resolve_exit_indices(4, ())
