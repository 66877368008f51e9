"""Loss maths of the teacher-free methods and the BYOT hint/ensemble, against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from _hand_math import kl, softmax

from sd_plugin.core import SelfDistillConfig, SelfDistillLoss, SelfDistillOutput, feature_hint
from sd_plugin.core.methods import class_pair_kd, pskd_term, tfkd_reg_term, tfkd_teacher


def test_tfkd_reg_matches_hand_computation():
    z = [1.0, -0.5, 2.0]
    a, T = 0.9, 2.0
    u = [(1 - a) / 2, a, (1 - a) / 2]  # label 1
    teacher = softmax([v / T for v in u])
    expected = kl(teacher, softmax(z))
    got = tfkd_reg_term(torch.tensor([z]), torch.tensor([1]), a, T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_tfkd_teacher_for_soft_targets_is_the_mix_of_the_one_hot_ones_before_softening():
    y = torch.tensor([[0.3, 0.7, 0.0]])
    a, T = 0.99, 20.0
    u = [a * 0.3 + (1 - a) / 2 * 0.7, a * 0.7 + (1 - a) / 2 * 0.3, (1 - a) / 2]
    expected = softmax([v / T for v in u])
    assert tfkd_teacher(y, 3, a, T)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_class_pair_kd_matches_hand_computation_and_checks_pairs():
    anchor, partner = [2.0, 0.0, -1.0], [0.5, 1.5, 0.0]
    T = 4.0
    expected = T * T * kl(softmax([v / T for v in partner]), softmax([v / T for v in anchor]))
    logits = torch.tensor([anchor, partner], requires_grad=True)
    got = class_pair_kd(logits, T, torch.tensor([1, 1]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0  # the partner is the teacher
    with pytest.raises(ValueError, match="same-class pairs"):
        class_pair_kd(logits.detach(), T, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="even batch"):
        class_pair_kd(torch.zeros(3, 3), T)


def test_pskd_term_is_cross_entropy_to_the_past_prediction():
    z = [0.2, 1.0, -1.0]
    past = [0.1, 0.6, 0.3]
    p = softmax(z)
    expected = -sum(t * math.log(q) for t, q in zip(past, p))
    assert pskd_term(torch.tensor([z]), torch.tensor([past])).item() == pytest.approx(expected, rel=1e-6)


def test_hint_forms_hand_computed():
    fs = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    ft = torch.tensor([[0.0, 4.0], [0.0, 1.0]])  # per-sample distances 5 and 1
    assert feature_hint(fs, ft, "mean").item() == pytest.approx(3.0)
    assert feature_hint(fs, ft, "squared").item() == pytest.approx(13.0)
    assert feature_hint(fs, ft, "rms").item() == pytest.approx(math.sqrt(13.0))
    with pytest.raises(ValueError, match="hint form"):
        feature_hint(fs, ft, "l1")


def test_rms_hint_at_034_reproduces_byot_whole_batch_l2_at_batch_128_and_is_batch_size_independent():
    torch.manual_seed(0)
    fs, ft = torch.randn(128, 16), torch.randn(128, 16)
    c = SelfDistillConfig(hint_form="rms", hint_weight=0.34)
    ours = c.hint_weight * feature_hint(fs, ft, c.hint_form)
    byot = 0.03 * torch.dist(fs, ft)  # lambda = 0.03 times the L2 distance over the whole batch tensor
    assert ours.item() == pytest.approx(byot.item(), rel=2e-3)  # 0.34 is 0.03 * sqrt(128) rounded
    twice = feature_hint(torch.cat([fs, fs]), torch.cat([ft, ft]), "rms")
    assert twice.item() == pytest.approx(feature_hint(fs, ft, "rms").item(), rel=1e-6)


def test_ensemble_is_softmax_of_mean_logits():
    a, b = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = SelfDistillOutput(b, torch.zeros(1, 2), [a], [torch.zeros(1, 2)])
    assert out.ensemble_probs().tolist()[0] == pytest.approx(softmax([2.0, 0.5]), rel=1e-6)
    # Where the two definitions disagree, the ensemble follows the mean logits (BYOT's code), not the mean softmax.
    x, y = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    o = SelfDistillOutput(y, torch.zeros(1, 2), [x, y.clone()], [torch.zeros(1, 2)] * 2)
    assert int(o.ensemble_probs().argmax()) == 0  # mean logits (1, 2/3)
    assert int(torch.stack([t.softmax(1) for t in (x, y, y)]).mean(0).argmax()) == 1  # mean softmax (0.497, 0.503)


def _out(logits, exits=()):
    n, c = logits.shape
    return SelfDistillOutput(logits, torch.zeros(n, 4), list(exits), [torch.zeros(n, 4) for _ in exits])


def test_methods_compose_with_label_smoothing_by_hand():
    z = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([0, 0])  # a same-class pair
    past = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    eps = 0.1
    ce_ls = F.cross_entropy(z, y, label_smoothing=eps)
    cfg = SelfDistillConfig(exit_indices=[], pskd_alpha=0.8, tfkd_weight=0.1, cskd_weight=1.0)
    loss = SelfDistillLoss(cfg, label_smoothing=eps)
    loss.past.update(torch.tensor([7, 3]), past)
    loss.set_progress(0.5)  # a_t = 0.4
    terms = loss.terms(_out(z), y, sample_index=torch.tensor([7, 3]))
    assert terms["loss_ce"].item() == pytest.approx((1 - 0.4) * (1 - 0.1) * ce_ls.item(), rel=1e-6)
    assert terms["loss_pskd"].item() == pytest.approx(0.4 * pskd_term(z, past).item(), rel=1e-6)
    assert terms["loss_tfkd"].item() == pytest.approx(0.1 * tfkd_reg_term(z, y, 0.99, 20.0).item(), rel=1e-6)
    assert terms["loss_cskd"].item() == pytest.approx(class_pair_kd(z, 4.0).item(), rel=1e-6)
    total = loss(_out(z), y, sample_index=torch.tensor([7, 3]))
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)


def test_methods_take_mixup_soft_targets():
    torch.manual_seed(0)
    z = torch.randn(4, 3, requires_grad=True)
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.6, 0.4], [0.4, 0.0, 0.6], [0.6, 0.0, 0.4]])
    cfg = SelfDistillConfig(exit_indices=[], pskd_alpha=0.8, tfkd_weight=0.1, cskd_weight=1.0)
    loss = SelfDistillLoss(cfg, label_smoothing=0.1)
    loss.set_progress(1.0)
    terms = loss.terms(_out(z), soft, sample_index=torch.arange(4))
    # Not seen yet: PS-KD's past prediction falls back to the (soft) target itself.
    soft_ce = -(soft * F.log_softmax(z, 1)).sum(1).mean()  # label smoothing is not applied twice to soft targets
    assert terms["loss_pskd"].item() == pytest.approx(0.8 * soft_ce.item(), rel=1e-6)
    assert terms["loss_ce"].item() == pytest.approx(0.2 * 0.9 * soft_ce.item(), rel=1e-6)
    sum(terms.values()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # The step stored this batch's predictions.
    assert torch.equal(loss.past.probs[:4], z.detach().softmax(1))


def test_byot_terms_with_a_method_and_warmup_scale():
    torch.manual_seed(1)
    z, e = torch.randn(2, 3), torch.randn(2, 3)
    feats = torch.randn(2, 4)
    out = SelfDistillOutput(z, torch.zeros(2, 4), [e], [feats])
    loss = SelfDistillLoss(tfkd_weight=0.1)
    loss.set_distill_scale(0.5)
    terms = loss.terms(out, torch.tensor([0, 2]))
    c = SelfDistillConfig()
    assert set(terms) == {"loss_ce", "loss_tfkd", "exit1_loss_ce", "exit1_loss_kd", "exit1_loss_hint"}
    assert terms["exit1_loss_hint"].item() == pytest.approx(
        0.5 * c.hint_weight * feature_hint(feats, torch.zeros(2, 4)).item(), rel=1e-6
    )


def test_pskd_needs_indices_and_progress():
    loss = SelfDistillLoss(exit_indices=[], pskd_alpha=0.8)
    with pytest.raises(ValueError, match="sample_index"):
        loss.terms(_out(torch.zeros(2, 3)), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="set_progress"):
        loss.terms(_out(torch.zeros(2, 3)), torch.tensor([0, 1]), sample_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="progress"):
        loss.set_progress(1.5)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(pskd_alpha=1.5), "pskd_alpha"),
        (dict(tfkd_weight=-0.1), "tfkd_weight"),
        (dict(cskd_temperature=0.0), "cskd_temperature"),
        (dict(tfkd_correct_prob=1.0), "tfkd_correct_prob"),
        (dict(hint_form="l2"), "hint_form"),
    ],
)
def test_bad_method_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        SelfDistillConfig(**options)
