"""Zipf's label smoothing (Liang et al., ECCV 2022): soft labels, loss value, gradients, wiring, options, arms."""

import pytest
import torch
import torch.nn.functional as F
from _hand_math import kl, softmax

from sd_plugin.core import SelfDistillConfig, SelfDistillLoss, SelfDistillOutput, self_distill_losses
from sd_plugin.core.methods import zipf_ranks, zipf_soft_labels, zipf_term
from tools.bench import arms

# Sample 0: the target (class 0) is the top class; ranks 1, 3, 2, 4.
# Sample 1: the target (class 2) ties with class 3 at rank 2 (ties share the smallest rank); ranks 4, 1, 2, 2.
Z = [[2.0, 0.5, 1.0, -1.0], [0.0, 3.0, 1.0, 1.0]]
Y = [0, 2]


def _out(logits, exits=()):
    n = logits.shape[0]
    return SelfDistillOutput(logits, torch.zeros(n, 4), list(exits), [torch.zeros(n, 4) for _ in exits])


def test_ranks_are_one_for_the_largest_and_ties_share_the_smallest_rank():
    assert zipf_ranks(torch.tensor(Z)).tolist() == [[1, 3, 2, 4], [4, 1, 2, 2]]
    assert zipf_ranks(torch.tensor([[1, 5, 5, 0]])).tolist() == [[3, 1, 1, 4]]  # integer scores (vote counts)


def test_soft_labels_by_hand():
    soft = zipf_soft_labels(torch.tensor(Z), torch.tensor(Y), power=1.0)
    # Sample 0: non-target ranks 3, 2, 4 -> 1/3, 1/2, 1/4 over 13/12.
    # Sample 1: non-target ranks 4, 1, 2 (class 3 keeps rank 2 next to the target) -> 1/4, 1, 1/2 over 7/4.
    expected = [[0.0, 4 / 13, 6 / 13, 3 / 13], [1 / 7, 4 / 7, 0.0, 2 / 7]]
    for got, want in zip(soft.tolist(), expected):
        assert got == pytest.approx(want, abs=1e-7)
    squared = zipf_soft_labels(torch.tensor(Z), torch.tensor(Y), power=2.0)
    assert squared[1].tolist() == pytest.approx([1 / 21, 16 / 21, 0.0, 4 / 21], abs=1e-7)


def test_loss_value_by_hand():
    # KL(zipf || softmax over the non-target logits only), summed over classes, batch mean.
    kl0 = kl([4 / 13, 6 / 13, 3 / 13], softmax([0.5, 1.0, -1.0]))
    kl1 = kl([1 / 7, 4 / 7, 2 / 7], softmax([0.0, 3.0, 1.0]))
    got = zipf_term(torch.tensor(Z), torch.tensor(Y), power=1.0)
    assert got.item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    assert got.dtype == torch.float32
    half = zipf_term(torch.tensor(Z, dtype=torch.bfloat16), torch.tensor(Y))
    assert half.dtype == torch.float32 and half.item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)


def test_ranking_side_is_detached_and_the_target_logit_gets_no_gradient():
    torch.manual_seed(0)
    z = torch.randn(5, 7, requires_grad=True)
    y = torch.tensor([0, 3, 6, 2, 2])
    assert not zipf_soft_labels(z, y).requires_grad
    zipf_term(z, y, 1.0).backward()
    # The same KL with the soft labels as a constant: any gradient through the ranking would differ.
    soft = zipf_soft_labels(z.detach(), y)
    z2 = z.detach().clone().requires_grad_(True)
    keep = ~F.one_hot(y, 7).bool()
    F.kl_div(F.log_softmax(z2[keep].view(5, 6), 1), soft[keep].view(5, 6), reduction="batchmean").backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-7)
    assert z.grad.gather(1, y[:, None]).abs().sum() == 0  # only the non-target logits are pulled
    # Separate ranking scores: no gradient reaches them.
    s = torch.randn(5, 7, requires_grad=True)
    zipf_term(z, y, 1.0, rank_scores=s).backward()
    assert s.grad is None


def test_soft_targets_use_their_largest_class():
    soft_y = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.4, 0.6, 0.0]])
    assert zipf_term(torch.tensor(Z), soft_y).item() == pytest.approx(
        zipf_term(torch.tensor(Z), torch.tensor(Y)).item(), rel=1e-7
    )


def test_weight_zero_adds_no_term_and_leaves_every_other_term_bit_exact():
    torch.manual_seed(1)
    z, e = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 4, 2])
    out = SelfDistillOutput(z, torch.randn(4, 3), [e], [torch.randn(4, 3)])
    base = self_distill_losses(out, y, SelfDistillConfig())
    off = self_distill_losses(out, y, SelfDistillConfig(zipf_weight=0.0, zipf_power=2.0))
    assert "loss_zipf" not in base and set(off) == set(base)
    assert all(torch.equal(off[k], base[k]) for k in base)


def test_wired_on_the_deepest_classifier_at_full_label_weight():
    z, y = torch.tensor(Z), torch.tensor(Y)
    e = torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    out = SelfDistillOutput(z, torch.zeros(2, 3), [e], [torch.zeros(2, 3)])
    plain = self_distill_losses(out, y, SelfDistillConfig())
    terms = self_distill_losses(out, y, SelfDistillConfig(zipf_weight=0.5, deepest_weight=2.0))
    assert terms["loss_zipf"].item() == pytest.approx(2.0 * 0.5 * zipf_term(z, y).item(), rel=1e-6)
    assert set(terms) == set(plain) | {"loss_zipf"}  # no exit gets a Zipf term
    assert torch.equal(plain["exit1_loss_ce"], terms["exit1_loss_ce"])
    assert terms["loss_ce"].item() == pytest.approx(2.0 * F.cross_entropy(z, y).item(), rel=1e-6)  # not scaled down
    loss = SelfDistillLoss(exit_indices=[], zipf_weight=0.1, label_smoothing=0.1)
    total = loss(_out(z), y)
    expected = F.cross_entropy(z, y, label_smoothing=0.1) + 0.1 * zipf_term(z, y)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "zipf_weight=0.1" in repr(loss)


def test_multi_label_is_refused():
    out = SelfDistillOutput(torch.zeros(2, 3), torch.zeros(2, 4), [], [], multi_label=True)
    with pytest.raises(ValueError, match="zipf_weight > 0.*multi-label"):
        self_distill_losses(out, torch.zeros(2, 3), SelfDistillConfig(exit_indices=[], zipf_weight=0.1))


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(zipf_weight=-0.1), ValueError, "zipf_weight must be a finite number >= 0"),
        (dict(zipf_weight=float("nan")), ValueError, "zipf_weight"),
        (dict(zipf_weight="0.1"), TypeError, "zipf_weight must be a number"),
        (dict(zipf_power=0.0), ValueError, r"zipf_power must be a finite number > 0.*authors: 1\.0"),
        (dict(zipf_power=-1.0), ValueError, "zipf_power"),
        (dict(zipf_power=float("inf")), ValueError, "zipf_power"),
        (dict(zipf_power=True), TypeError, "zipf_power must be a number"),
    ],
)
def test_bad_options_name_the_option(options, error, match):
    with pytest.raises(error, match=match):
        SelfDistillConfig(**options)


def test_defaults_are_off_with_the_authors_power():
    c = SelfDistillConfig()
    assert c.zipf_weight == 0.0 and c.zipf_power == 1.0
    assert SelfDistillConfig(zipf_weight=1.0).zipf_weight == 1.0  # not a mixing weight: the authors use 1.0 too


def test_term_input_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        zipf_term(torch.zeros(2, 1), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="labels must lie"):
        zipf_term(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="target must be"):
        zipf_term(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="power"):
        zipf_term(torch.zeros(2, 3), torch.tensor([0, 1]), power=0.0)


def test_arms_zipf_and_byot_plus_zipf():
    both = arms.parse_arm("byot+zipf")
    assert both.exits and both.options == {"zipf_weight": 0.1, "zipf_power": 1.0}
    assert not both.class_pairs and not both.pskd and both.label_smoothing == 0.0
    alone = arms.parse_arm("zipf")
    assert not alone.exits and alone.options == {"zipf_weight": 0.1, "zipf_power": 1.0, "exit_indices": []}
    SelfDistillConfig(**both.options)
    SelfDistillConfig(**alone.options)
