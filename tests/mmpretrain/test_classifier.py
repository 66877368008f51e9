"""Behaviour of SelfDistillClassifier: losses, predict_exit, MultiExitModel, metric, warm-up hook."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _mmp_helpers import NUM_CLASSES, batch, build_pair, load_model_cfg

from sd_plugin.core import MultiExitModel, SelfDistillConfig, get_submodule, soft_cross_entropy
from sd_plugin.core.losses import feature_hint, kd_kl_div

pytestmark = pytest.mark.mmpretrain

RESNET_CIFAR = "resnet/resnet18_8xb16_cifar10.py"


@pytest.fixture(scope="module")
def pair() -> Any:
    return build_pair(load_model_cfg(RESNET_CIFAR))


def test_exits_found_after_every_stage_but_the_last(pair: Any) -> None:
    sd, _ = pair
    assert [p.module for p in sd.exit_points] == ["layer1", "layer2", "layer3"]
    assert [p.channels for p in sd.exit_points] == [64, 128, 256]
    assert [p.stride for p in sd.exit_points] == [8, 4, 2]
    # The user's backbone config is untouched.
    assert tuple(sd.backbone.out_indices) == (3,)
    assert isinstance(sd, MultiExitModel)


def test_exit_heads_copy_the_users_head(pair: Any) -> None:
    sd, _ = pair
    for head in sd.exit_heads:
        assert type(head) is type(sd.head)
        assert type(head.loss_module) is type(sd.head.loss_module)
        assert head.fc.in_features == sd.head.fc.in_features
        assert head.num_classes == NUM_CLASSES


def test_loss_terms_follow_the_core_maths(pair: Any) -> None:
    sd, _ = pair
    sd.train()
    inputs, samples = batch(sd, 32, n=4)
    losses = sd(inputs, samples, mode="loss")
    _, out = sd._forward_all(inputs)  # same weights; BN batch stats make the second pass identical
    target = torch.tensor([s.gt_label.item() for s in samples])
    cfg = SelfDistillConfig()
    torch.testing.assert_close(losses["loss_ce"], soft_cross_entropy(out.logits, target))
    for k in range(1, sd.num_exits + 1):
        torch.testing.assert_close(
            losses[f"exit{k}_loss_ce"], cfg.ce_weight * soft_cross_entropy(out.exit_logits[k - 1], target)
        )
    # KD and hint: the teacher is the plain ImageClassifier with the same weights (logits; neck output as the
    # features), computed here independently of the adapter's own forward.
    sd_cfg = sd.sd_config
    plain = pair[1].train()
    teacher_logits = plain(inputs, mode="tensor")
    teacher_features = plain.head.pre_logits(plain.extract_feat(inputs))
    torch.testing.assert_close(out.logits, teacher_logits)
    for k in range(1, sd.num_exits + 1):
        kd = losses[f"exit{k}_loss_kd"]
        hint = losses[f"exit{k}_loss_hint"]
        assert kd.requires_grad and hint.requires_grad
        want_kd = sd_cfg.kd_weight * kd_kl_div(out.exit_logits[k - 1], teacher_logits, sd_cfg.temperature)
        want_hint = sd_cfg.hint_weight * feature_hint(out.exit_features[k - 1], teacher_features, sd_cfg.hint_form)
        torch.testing.assert_close(kd, want_kd)
        torch.testing.assert_close(hint, want_hint)
        assert kd.item() > 0 and hint.item() > 0  # a random exit disagrees with the deepest classifier


def test_distill_scale_scales_kd_and_hint_only(pair: Any) -> None:
    sd, _ = pair
    sd.train()
    inputs, samples = batch(sd, 32, n=4)
    full = sd(inputs, samples, mode="loss")
    sd.set_distill_scale(0.0)
    try:
        zero = sd(inputs, samples, mode="loss")
    finally:
        sd.set_distill_scale(1.0)
    assert zero["exit1_loss_kd"].item() == 0 and zero["exit2_loss_hint"].item() == 0
    torch.testing.assert_close(zero["exit1_loss_ce"], full["exit1_loss_ce"])
    assert full["exit1_loss_hint"].item() > 0


def test_predict_exit_k_and_ensemble(pair: Any) -> None:
    sd, _ = pair
    sd.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _, out = sd._forward_all(x)
        feature_of = {}
        handle = get_submodule(sd.tapped_module(), sd.exit_points[1].module).register_forward_hook(
            lambda m, a, o: feature_of.setdefault("f", o)
        )
        deepest = sd.forward_deepest(x)
        handle.remove()
        torch.testing.assert_close(deepest, out.logits)
        torch.testing.assert_close(sd.forward_exit(1, feature_of["f"]), out.exit_logits[1])
        sd.sd_config.predict_exit = 2
        torch.testing.assert_close(sd(x, mode="tensor"), out.exit_logits[1])
        sd.sd_config.predict_exit = "ensemble"
        torch.testing.assert_close(sd(x, mode="tensor").softmax(1), out.ensemble_probs())
        preds = sd(x, mode="predict")
        torch.testing.assert_close(torch.stack([p.pred_score for p in preds]), out.ensemble_probs())
    sd.sd_config.predict_exit = "deepest"


def test_hook_returning_smaller_batch_shrinks_the_rest_of_the_model(pair: Any) -> None:
    sd, _ = pair
    sd.eval()
    point = sd.exit_points[0]
    module = get_submodule(sd.tapped_module(), point.module)
    handle = module.register_forward_hook(lambda m, a, o: o[:1])
    try:
        with torch.no_grad():
            logits = sd.forward_deepest(torch.randn(4, 3, 32, 32))
    finally:
        handle.remove()
    assert logits.shape == (1, NUM_CLASSES)


def test_val_step_attaches_exit_scores_for_the_metric(pair: Any) -> None:
    from mmpretrain.structures import DataSample

    from sd_plugin.mmpretrain_adapter import MultiExitAccuracy

    sd, _ = pair
    sd.eval()
    imgs = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(4)]
    samples = [DataSample().set_gt_label(i % NUM_CLASSES) for i in range(4)]
    metric = MultiExitAccuracy(topk=(1, 2))  # a metric that reads exit scores: val_step now computes them
    with torch.no_grad():
        outs = sd.val_step({"inputs": imgs, "data_samples": samples})
        plain = sd.predict(sd.data_preprocessor({"inputs": imgs, "data_samples": None}, False)["inputs"])
    assert all("exit_scores" not in p for p in plain)
    scores = torch.stack([o.exit_scores for o in outs])
    assert scores.shape == (4, sd.num_exits + 1, NUM_CLASSES)
    torch.testing.assert_close(scores[:, -1], torch.stack([o.pred_score for o in outs]))

    metric.process({}, [o.to_dict() for o in outs])
    res = metric.evaluate(4)
    labels = torch.tensor([i % NUM_CLASSES for i in range(4)])
    for k in range(1, sd.num_exits + 1):
        want = 100.0 * (scores[:, k - 1].argmax(1) == labels).float().mean().item()
        assert res[f"multi-exit/exit{k}_top1"] == pytest.approx(want)
    # BYOT's ensemble: the softmax of the mean logits (= of the mean log-probabilities)
    want = 100.0 * (scores.log().mean(1).argmax(1) == labels).float().mean().item()
    assert res["multi-exit/ensemble_top1"] == pytest.approx(want)
    assert res["multi-exit/deepest_top2"] >= res["multi-exit/deepest_top1"]


def test_metric_without_exit_scores_explains() -> None:
    from sd_plugin.mmpretrain_adapter import MultiExitAccuracy

    with pytest.raises(KeyError, match="SelfDistillClassifier"):
        MultiExitAccuracy().process({}, [{"pred_score": torch.ones(3), "gt_label": torch.tensor([0])}])
    with pytest.raises(ValueError, match="topk"):
        MultiExitAccuracy(topk=0)


def test_warmup_hook_ramps_and_unwraps(pair: Any) -> None:
    from sd_plugin.mmpretrain_adapter import DistillWeightWarmupHook

    sd, _ = pair
    hook = DistillWeightWarmupHook(warmup_iters=10)
    wrapper = SimpleNamespace(module=sd)
    import sd_plugin.mmpretrain_adapter.warmup_hook as wh

    for it, want in ((0, 0.0), (5, 0.5), (20, 1.0)):
        runner = SimpleNamespace(model=sd, iter=it)
        hook.before_train_iter(runner, 0)
        assert sd.distill_loss.distill_scale == pytest.approx(want)
    original = wh.is_model_wrapper
    wh.is_model_wrapper = lambda m: m is wrapper  # type: ignore[assignment]
    try:
        hook.before_train_iter(SimpleNamespace(model=wrapper, iter=2), 0)
    finally:
        wh.is_model_wrapper = original
    assert sd.distill_loss.distill_scale == pytest.approx(0.2)
    by_epoch = DistillWeightWarmupHook(warmup_epochs=2)
    assert by_epoch.scale_at(SimpleNamespace(iter=3, train_dataloader=[0] * 3)) == pytest.approx(0.5)
    sd.set_distill_scale(1.0)
    with pytest.raises(ValueError, match="exactly one"):
        DistillWeightWarmupHook()
    with pytest.raises(TypeError, match="SelfDistillClassifier"):
        hook.before_train_iter(SimpleNamespace(model=torch.nn.Linear(1, 1), iter=0), 0)


def test_plain_checkpoint_loads_exits_start_fresh(pair: Any) -> None:
    sd, plain = pair
    from mmpretrain.registry import MODELS

    fresh = MODELS.build(dict(load_model_cfg(RESNET_CIFAR), type="SelfDistillClassifier"))
    missing, unexpected = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith(("exit_necks.", "exit_heads.")) for k in missing)
    torch.testing.assert_close(fresh.head.fc.weight, plain.head.fc.weight)


def test_multi_exit_accuracy_reports_the_calibrated_ensemble(tmp_path):
    """By hand: 2 classifiers, 3 samples; equal weights get 1 of 3 right, weights [0, 1] (deepest) get 2."""
    from sd_plugin.deploy import ExitPolicy
    from sd_plugin.mmpretrain_adapter import MultiExitAccuracy

    exit1 = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    deepest = torch.tensor([[0.4, 0.6], [0.4, 0.6], [0.6, 0.4]])
    labels = [1, 1, 1]
    results = [{"scores": torch.stack([exit1[i], deepest[i]]), "label": torch.tensor([labels[i]])} for i in range(3)]
    ExitPolicy([None], ensemble_weights=[0.0, 1.0]).save(tmp_path / "policy.json")
    metrics = MultiExitAccuracy(policy=str(tmp_path / "policy.json")).compute_metrics(results)
    assert metrics["exit1_top1"] == pytest.approx(0.0) and metrics["deepest_top1"] == pytest.approx(200 / 3)
    # equal weights: mean log-prob favours class 0 on every sample (log .9 + log .4 > log .1 + log .6)
    assert metrics["ensemble_top1"] == pytest.approx(0.0)
    assert metrics["calibrated_ensemble_top1"] == pytest.approx(200 / 3)
    assert "calibrated_ensemble_top1" not in MultiExitAccuracy().compute_metrics(results)
    with pytest.raises(ValueError, match="no ensemble_weights"):
        ExitPolicy([None]).save(tmp_path / "bare.json")
        MultiExitAccuracy(policy=str(tmp_path / "bare.json"))
