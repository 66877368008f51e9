"""The user's head keeps its own loss: deepest ``loss_ce`` == the plain ImageClassifier's loss, for every head type.

Each case is a packaged MMPretrain config (shrunk: 5 classes, small input, tiny
widths) built twice with the same weights, as ``ImageClassifier`` and as
``SelfDistillClassifier`` (the two lines); both get the same preprocessed batch
(the config's Mixup/CutMix applied once) and the same random seed (dropout,
drop path), and the deepest loss must be bit-identical. Heads that could not be
wrapped before (no ``in_channels``, two classifiers, logits computed by the
backbone) must also train: one step gives every exit parameter a finite,
non-zero gradient.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
from _mmp_helpers import (
    NUM_CLASSES,
    backward_reaches_every_exit,
    batch,
    build_pair,
    load_model_cfg,
    packaged,
    predict_like_plain,
)

from sd_plugin.core import SelfDistillConfig, kd_kl_div

pytestmark = pytest.mark.mmpretrain

RESNET_CIFAR = "resnet/resnet18_8xb16_cifar10.py"
ARCFACE = "arcface/resnet50-arcface_8xb32_inshop.py"  # an image retriever config: its head goes on ResNet-18


def _arcface_head(num_subcenters: int) -> Dict[str, Any]:
    """The packaged ArcFace config's head, for ResNet-18's 512 features."""
    from mmengine import Config

    head = Config.fromfile(packaged(ARCFACE)).model.head.to_dict()
    return dict(head, in_channels=512, num_subcenters=num_subcenters)


def _levit_small() -> Dict[str, Any]:
    return {"backbone.img_size": 64, "head.distillation": False}


# (packaged config, shrinking overrides, input size, exit classifier kind)
EXACT: Dict[str, Tuple[str, Dict[str, Any], int, str]] = {
    "linear_ce": (RESNET_CIFAR, {}, 32, "copy"),
    "stacked_dropout": ("mobilenet_v3/mobilenet-v3-small-050_8xb128_in1k.py", {}, 32, "copy"),
    "vit_hidden_layer": (
        "vision_transformer/vit-base-p16_64xb64_in1k.py",
        {"backbone.arch": "deit-tiny", "backbone.img_size": 32, "head.in_channels": 192, "head.hidden_dim": 64},
        32,
        "copy",
    ),
    "label_smoothing": ("convnext_v2/convnext-v2-atto_32xb32_in1k.py", {}, 32, "copy"),
    "focal": (RESNET_CIFAR, {"head.loss": {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}}, 32, "copy"),
    # Mixup + CutMix soft targets with a sigmoid cross-entropy (ResNet strikes back A3).
    "soft_mixup_cutmix": (
        "resnet/resnet50_8xb256-rsb-a3-100e_in1k.py",
        {"backbone.depth": 18, "head.in_channels": 512},
        32,
        "copy",
    ),
    # Label smoothing and Mixup/CutMix soft targets (DeiT's recipe).
    "smooth_soft_targets": ("deit/deit-tiny_4xb256_in1k.py", {"backbone.img_size": 32}, 32, "copy"),
    "arcface": (RESNET_CIFAR, {"head": _arcface_head(1)}, 32, "copy"),
    "arcface_subcenters": (RESNET_CIFAR, {"head": _arcface_head(3)}, 32, "copy"),
}

# Heads that raised TypeError before (UNSUPPORTED_HEADS, no in_channels attribute, tuple outputs).
NEW: Dict[str, Tuple[str, Dict[str, Any], int, str]] = {
    # Two classifiers (conv and transformer branches): exits get a LinearClsHead with the head's loss.
    "conformer": (
        "conformer/conformer-tiny-p16_8xb128_in1k.py",
        {
            "backbone.arch": {"embed_dims": 64, "depths": 6, "num_heads": 2, "channel_ratio": 1},
            "backbone.base_channels": 16,
            "head.in_channels": [64, 64],
        },
        32,
        "linear",
    ),
    "levit": ("levit/levit-128s_8xb256_in1k.py", _levit_small(), 64, "copy"),
    # VigClsHead keeps no in_channels attribute; the packaged Vig backbones need 224 px (slow set).
    "vig_head_on_resnet": (
        RESNET_CIFAR,
        {"head": {"type": "VigClsHead", "in_channels": 512, "hidden_dim": 64, "dropout": 0.2}},
        32,
        "copy",
    ),
    "vig": ("vig/vig-tiny_8xb128_in1k.py", {"head.hidden_dim": 64}, 224, "copy"),
    "pyramid_vig": ("vig/pvig-tiny_8xb128_in1k.py", {"head.hidden_dim": 64}, 224, "copy"),
    # Its last stage's attention is built for 7x7 maps: 224 px.
    "efficientformer": ("efficientformer/efficientformer-l1_8xb128_in1k.py", {"head.distillation": False}, 224, "copy"),
    "deit_distilled": ("deit/deit-tiny-distilled_4xb256_in1k.py", {"backbone.img_size": 32}, 32, "linear"),
    "lenet_logits_in_backbone": ("lenet/lenet5_mnist.py", {}, 32, "logits"),
    "inception_v3_logits_in_backbone": ("inception_v3/inception-v3_8xb32_in1k.py", {}, 96, "logits"),
    "vgg11_logits_in_backbone": ("vgg/vgg11_8xb32_in1k.py", {}, 224, "logits"),
}
SLOW = {
    "inception_v3_logits_in_backbone",
    "vgg11_logits_in_backbone",
    "efficientformer",
    "vig",
    "pyramid_vig",
    # ViT-type and two-branch builds: the slowest of the rest (the fast subset keeps the CNN head cases)
    "vit_hidden_layer",
    "smooth_soft_targets",
    "label_smoothing",
    "deit_distilled",
    "levit",
    "conformer",
    "vig_head_on_resnet",
}

# Exit placement is not this file's subject: a backbone the probe cannot run at its default sizes gets probe_size.
OPTIONS: Dict[str, Dict[str, Any]] = {
    "lenet_logits_in_backbone": {"probe_size": 32},  # LeNet-5 takes exactly 32x32 (the probe tries 224)
}


def _batch(model: torch.nn.Module, size: int, n: int = 4) -> Tuple[torch.Tensor, List[Any]]:
    """A preprocessed training batch; 1-channel images for a 1-channel preprocessor (LeNet on MNIST)."""
    mean = getattr(model.data_preprocessor, "mean", None)
    if mean is not None and mean.shape[0] == 1:
        from mmpretrain.structures import DataSample

        g = torch.Generator().manual_seed(0)
        imgs = [torch.randint(0, 256, (1, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]
        samples = [DataSample().set_gt_label(i % NUM_CLASSES) for i in range(n)]
        data = model.data_preprocessor({"inputs": imgs, "data_samples": samples}, True)
        return data["inputs"], data["data_samples"]
    return batch(model, size, n=n)


def _losses(model: torch.nn.Module, inputs: torch.Tensor, samples: List[Any]) -> Dict[str, torch.Tensor]:
    torch.manual_seed(1234)  # the same dropout / drop-path draws for both models
    return model(inputs, samples, mode="loss")


def _model_cfg(rel: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    cfg = load_model_cfg(rel, overrides)
    if cfg["head"]["type"] == "ClsHead":  # the backbone computes the logits: it gets the number of classes
        cfg["head"].pop("num_classes")
        cfg["backbone"]["num_classes"] = NUM_CLASSES
    return cfg


_BUILT: Dict[str, Tuple[Any, Any, int, str]] = {}


def _pair(case: str) -> Tuple[Any, Any, int, str]:
    """(SelfDistillClassifier, ImageClassifier with its weights, input size, exit classifier kind), built once."""
    if case not in _BUILT:
        rel, overrides, size, kind = {**EXACT, **NEW}[case]
        sd, plain = build_pair(_model_cfg(rel, overrides), **OPTIONS.get(case, {}))
        _BUILT[case] = (sd, plain, size, kind)
    return _BUILT[case]


@pytest.fixture(autouse=True, scope="module")
def _free_models() -> Iterator[None]:
    yield
    _BUILT.clear()


def _check_deepest_is_plain(sd: Any, plain: Any, size: int) -> Dict[str, torch.Tensor]:
    sd.train()
    plain.train()
    inputs, samples = _batch(sd, size)
    want = _losses(plain, inputs, samples)
    got = _losses(sd, inputs, samples)
    assert set(want) == {"loss"}
    assert got["loss_ce"].item() == want["loss"].item(), (got["loss_ce"].item(), want["loss"].item())
    return got


def _params(cases: Dict[str, Any]) -> List[Any]:
    return [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in cases]


@pytest.mark.parametrize("case", _params(EXACT))
def test_deepest_loss_is_the_heads_own_loss(case: str) -> None:
    sd, plain, size, kind = _pair(case)
    assert sd.exit_head_kind == kind
    losses = _check_deepest_is_plain(sd, plain, size)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("case", _params(NEW))
def test_previously_unsupported_head_trains(case: str) -> None:
    sd, plain, size, kind = _pair(case)
    assert sd.exit_head_kind == kind
    assert sd.num_exits >= 2
    losses = _check_deepest_is_plain(sd, plain, size)
    expected = {"loss_ce"} | {f"exit{k}_loss_{t}" for k in range(1, sd.num_exits + 1) for t in ("ce", "kd", "hint")}
    assert set(losses) == expected
    backward_reaches_every_exit(sd, losses)
    # Inference is the plain model's.
    predict_like_plain(sd, plain, _batch(sd, size, n=2)[0])


@pytest.mark.parametrize("subcenters", [1, 3])
def test_margin_head_exits_use_the_margin_and_distil_plain_logits(subcenters: int) -> None:
    """ArcFace: each exit's label loss is its own head's loss (margin inside); KD compares margin-free logits."""
    sd = _pair("arcface" if subcenters == 1 else "arcface_subcenters")[0]
    assert sd.head.num_subcenters == subcenters
    sd.train()
    inputs, samples = _batch(sd, 32)
    losses = sd(inputs, samples, mode="loss")
    # Recompute from the same batch (train-mode BatchNorm uses the batch's statistics: same values).
    feats, tapped = sd._tapped_forward(inputs)
    cfg = SelfDistillConfig()
    teacher = sd.head(feats)  # no target: the prediction logits, without the margin
    with_margin = sd.head(feats, torch.cat([s.gt_label for s in samples]))
    assert not torch.allclose(teacher, with_margin)
    for k, feature in enumerate(tapped):
        exit_feats = sd.exit_necks[k](feature)
        own = sd.exit_heads[k].loss(exit_feats, samples)["loss"]
        torch.testing.assert_close(losses[f"exit{k + 1}_loss_ce"], cfg.ce_weight * own, rtol=0, atol=1e-6)
        student = sd.exit_heads[k](exit_feats)
        kd = cfg.kd_weight * kd_kl_div(student, teacher, cfg.temperature)
        torch.testing.assert_close(losses[f"exit{k + 1}_loss_kd"], kd, rtol=0, atol=1e-6)
        kd_margin = cfg.kd_weight * kd_kl_div(student, with_margin, cfg.temperature)
        assert abs(kd_margin.item() - kd.item()) > 1e-4


def test_deepest_head_runs_once_per_step() -> None:
    sd = _pair("linear_ce")[0]
    sd.train()
    inputs, samples = _batch(sd, 32)
    calls = []
    handle = sd.head.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    try:
        sd(inputs, samples, mode="loss")
    finally:
        handle.remove()
    assert calls == [1]


@pytest.mark.slow
def test_distilled_head_that_mmpretrain_cannot_train_names_the_fix() -> None:
    sd, plain = build_pair(load_model_cfg("levit/levit-128s_8xb256_in1k.py", {"backbone.img_size": 64}))
    assert sd.exit_head_kind == "copy" and not sd.exit_heads[0].distillation
    sd.train()
    plain.train()
    inputs, samples = _batch(sd, 64, n=2)
    with pytest.raises(NotImplementedError):
        plain(inputs, samples, mode="loss")
    with pytest.raises(ValueError, match="distillation=False"):
        sd(inputs, samples, mode="loss")
