"""SelfDistillClassifier keeps ImageClassifier's behaviour: features, predictions, Pretrained init, paramwise_cfg.

Every check compares against the real ``mmpretrain.models.ImageClassifier`` built from the same packaged config with
the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from _mmp_helpers import NUM_CLASSES, build_pair, load_model_cfg, packaged

pytestmark = pytest.mark.mmpretrain

RESNET_CIFAR = "resnet/resnet18_8xb16_cifar10.py"
DEIT = ("deit/deit-tiny_4xb256_in1k.py", {"backbone.img_size": 32})
CONVNEXT = ("convnext/convnext-tiny_32xb128_in1k.py", {"backbone.arch": "atto", "head.in_channels": 320})
EXIT_PREFIXES = ("exit_necks.", "exit_heads.")


@pytest.fixture(scope="module", params=["resnet_cifar", pytest.param("deit_tiny", marks=pytest.mark.slow)])
def pair(request: Any) -> Any:
    cfg = load_model_cfg(RESNET_CIFAR) if request.param == "resnet_cifar" else load_model_cfg(*DEIT)
    sd, plain = build_pair(cfg)
    return sd.eval(), plain.eval()


def _x(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))


def test_extract_feat_and_extract_feats_every_stage(pair: Any) -> None:
    sd, plain = pair
    with torch.no_grad():
        for stage in ("backbone", "neck", "pre_logits"):
            got, want = sd.extract_feat(_x(), stage=stage), plain.extract_feat(_x(), stage=stage)
            assert _equal(got, want), stage
        multi = [_x(seed=1), _x(seed=2)]  # test-time augmentation: one batch per view
        assert _equal(sd.extract_feats(multi, stage="pre_logits"), plain.extract_feats(multi, stage="pre_logits"))
        assert _equal(sd(_x(), mode="tensor"), plain(_x(), mode="tensor"))


def test_predict_with_and_without_data_samples(pair: Any) -> None:
    from mmpretrain.structures import DataSample

    sd, plain = pair
    with torch.no_grad():
        bare_sd, bare_plain = sd.predict(_x()), plain.predict(_x())
        samples = [DataSample().set_gt_label(i) for i in range(2)]
        given = sd.predict(_x(), [DataSample().set_gt_label(i) for i in range(2)])
        given_plain = plain.predict(_x(), samples)
        via_forward = sd(_x(), mode="predict")
    for outs in (bare_sd, given, via_forward):
        assert len(outs) == 2 and all(isinstance(s, DataSample) for s in outs)
        for got, want in zip(outs, bare_plain):
            assert torch.equal(got.pred_score, want.pred_score) and torch.equal(got.pred_label, want.pred_label)
            assert "exit_scores" not in got  # outside the Runner's val/test loops nothing extra is computed
    assert [int(s.gt_label) for s in given] == [int(s.gt_label) for s in given_plain] == [0, 1]
    assert set(bare_sd[0].keys()) == set(bare_plain[0].keys())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_init_cfg_pretrained_loads_a_plain_checkpoint_exits_fresh(tmp_path: Path) -> None:
    from mmengine.logging import MMLogger
    from mmpretrain.registry import MODELS

    cfg = load_model_cfg(RESNET_CIFAR)
    _, plain = build_pair(cfg)
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": plain.state_dict(), "meta": {}}, path)

    torch.manual_seed(1)
    reference = MODELS.build(dict(cfg, type="SelfDistillClassifier"))
    reference.init_weights()
    torch.manual_seed(1)
    loaded = MODELS.build(
        dict(cfg, type="SelfDistillClassifier", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    )
    records = _Records()
    logger = MMLogger.get_current_instance()
    logger.addHandler(records)
    try:
        loaded.init_weights()
    finally:
        logger.removeHandler(records)

    state, plain_state, ref_state = loaded.state_dict(), plain.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain_state.items())  # backbone, neck, head: the checkpoint's
    exit_keys = [k for k in state if k.startswith(EXIT_PREFIXES)]
    assert exit_keys and all(torch.equal(state[k], ref_state[k]) for k in exit_keys)  # exits: their own init
    assert not torch.equal(state["backbone.conv1.weight"], ref_state["backbone.conv1.weight"])
    assert any("exits start from their initialisation" in m for m in records.messages), records.messages


def _lr_by_name(model: torch.nn.Module, paramwise_cfg: Dict[str, Any]) -> Dict[str, float]:
    from mmengine.optim import build_optim_wrapper

    wrapper = build_optim_wrapper(
        model, dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-4), paramwise_cfg=paramwise_cfg)
    )
    lr = {id(p): g["lr"] for g in wrapper.optimizer.param_groups for p in g["params"]}
    return {n: lr[id(p)] for n, p in model.named_parameters()}


def test_paramwise_custom_keys_of_a_real_config() -> None:
    """A packaged fine-tuning config's ``custom_keys={'head': dict(lr_mult=10)}``: the model's parameters get exactly
    what they get in the plain ImageClassifier; the exit heads (copies of the head, trained from scratch like it)
    match ``'head'`` too, deliberately; the exit necks do not (``'neck'`` keys reach them); an ``'exit_heads'`` key
    (longer keys win) opts out."""
    from mmengine import Config

    paramwise = Config.fromfile(packaged("csra/resnet101-csra_1xb16_voc07-448px.py")).optim_wrapper.paramwise_cfg
    paramwise = paramwise.to_dict()
    assert paramwise == {"custom_keys": {"head": {"lr_mult": 10}}}
    sd, plain = build_pair(load_model_cfg(RESNET_CIFAR))
    lr_sd, lr_plain = _lr_by_name(sd, paramwise), _lr_by_name(plain, paramwise)
    assert {n: lr_sd[n] for n in lr_plain} == lr_plain
    assert {lr_plain[n] for n in lr_plain if n.startswith("head.")} == {0.1 * 10}
    assert {lr_plain[n] for n in lr_plain if n.startswith("backbone.")} == {0.1}
    assert {v for n, v in lr_sd.items() if n.startswith("exit_heads.")} == {0.1 * 10}
    assert {v for n, v in lr_sd.items() if n.startswith("exit_necks.")} == {0.1}

    opt_out = {"custom_keys": {"head": {"lr_mult": 10}, "exit_heads": {"lr_mult": 1.0}}}
    lr_out = _lr_by_name(sd, opt_out)
    assert {n: lr_out[n] for n in lr_plain} == lr_plain
    assert {v for n, v in lr_out.items() if n.startswith(EXIT_PREFIXES)} == {0.1}
    necks = _lr_by_name(sd, {"custom_keys": {"neck": {"lr_mult": 2}}})  # 'neck' keys reach the exit necks
    assert {v for n, v in necks.items() if n.startswith("exit_necks.")} == {0.1 * 2}
    assert sd.head.num_classes == NUM_CLASSES


def test_layer_decay_constructor_of_a_real_config_puts_each_exit_at_its_stage() -> None:
    """mmpretrain's ``LearningRateDecayOptimWrapperConstructor`` with a real config's settings (MAE fine-tuning):
    the model's parameters get exactly the plain ImageClassifier's lr and decay; each exit the lr of the deepest
    layer of the stage it reads."""
    from mmengine import Config
    from mmpretrain.engine.optimizers import LearningRateDecayOptimWrapperConstructor

    cfg = Config.fromfile(packaged("mae/benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py")).optim_wrapper.to_dict()
    assert cfg.pop("constructor") == "LearningRateDecayOptimWrapperConstructor"
    paramwise = cfg.pop("paramwise_cfg")
    sd, plain = build_pair(load_model_cfg(*CONVNEXT))

    def groups(model: torch.nn.Module) -> Dict[str, Tuple[float, float]]:
        wrapper = LearningRateDecayOptimWrapperConstructor(dict(cfg, type="OptimWrapper"), paramwise)(model)
        by_id = {id(p): (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups for p in g["params"]}
        return {n: by_id[id(p)] for n, p in model.named_parameters()}

    got, want = groups(sd), groups(plain)
    assert {n: got[n] for n in want} == want
    assert len({lr for lr, _ in want.values()}) > 4  # the decay took effect
    head_lr = max(lr for n, (lr, _) in got.items() if n.startswith("head."))
    for k, point in enumerate(sd.exit_points):
        stage = {lr for n, (lr, _) in want.items() if n.startswith(f"backbone.{point.module}.")}
        exit_lrs = {lr for n, (lr, _) in got.items() if n.startswith((f"exit_necks.{k}.", f"exit_heads.{k}."))}
        assert exit_lrs == {max(stage)} and max(stage) < head_lr, point.module
