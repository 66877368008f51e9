"""SelfDistillClassifier on MMPretrain's packaged classification configs, one per backbone family.

Each case loads the packaged config, adds ``type='SelfDistillClassifier'`` (the
two lines), shrinks it (5 classes, small input, smallest variant of the
family), runs one training step and checks that every exit parameter gets a
gradient and that inference equals the plain ImageClassifier with the same weights.
"""

from __future__ import annotations

from typing import Any, Dict
from unittest import mock

import pytest
import torch
from _mmp_helpers import batch, build_pair, exit_param_grads, load_model_cfg

pytestmark = pytest.mark.mmpretrain

GAP = {"type": "GlobalAveragePooling"}

# (packaged config, shrinking overrides, input size)
CASES: Dict[str, Any] = {
    "resnet18_in1k": ("resnet/resnet18_8xb32_in1k.py", {}, 32),
    "resnet18_cifar": ("resnet/resnet18_8xb16_cifar10.py", {}, 32),
    "resnet34_cifar": ("resnet/resnet34_8xb16_cifar10.py", {}, 32),
    "resnetv1d": ("resnet/resnetv1d50_8xb32_in1k.py", {}, 32),
    "resnext50": ("resnext/resnext50-32x4d_8xb32_in1k.py", {}, 32),
    "seresnet50": ("seresnet/seresnet50_8xb32_in1k.py", {}, 32),
    "regnetx_400mf": ("regnet/regnetx-400mf_8xb128_in1k.py", {}, 32),
    "mobilenet_v2": ("mobilenet_v2/mobilenet-v2_8xb32_in1k.py", {}, 32),
    "mobilenet_v3_small": ("mobilenet_v3/mobilenet-v3-small_8xb128_in1k.py", {}, 32),
    "efficientnet_b0": ("efficientnet/efficientnet-b0_8xb32_in1k.py", {}, 32),
    "shufflenet_v2": ("shufflenet_v2/shufflenet-v2-1x_16xb64_in1k.py", {}, 32),
    "densenet121": ("densenet/densenet121_4xb256_in1k.py", {}, 32),
    # VGG's packaged config computes the logits in the backbone (ClsHead has no classifier of its
    # own); the exits need a real head, so the backbone's classifier is replaced by GAP + LinearClsHead.
    "vgg11bn": (
        "vgg/vgg11bn_8xb32_in1k.py",
        {"backbone.num_classes": -1, "neck": GAP, "head": {"type": "LinearClsHead", "in_channels": 512}},
        32,
    ),
    "convnext_atto": ("convnext/convnext-tiny_32xb128_in1k.py", {"backbone.arch": "atto", "head.in_channels": 320}, 32),
    "swin_tiny": (
        "swin_transformer/swin-tiny_16xb64_in1k.py",
        {"backbone.img_size": 64, "backbone.pad_small_map": True},
        64,
    ),
    "deit_tiny": ("deit/deit-tiny_4xb256_in1k.py", {"backbone.img_size": 32}, 32),
    "vit_hidden_head": (
        "vision_transformer/vit-base-p16_64xb64_in1k.py",
        {"backbone.arch": "deit-tiny", "backbone.img_size": 32, "head.in_channels": 192, "head.hidden_dim": 64},
        32,
    ),
    "convmixer_isotropic": (
        "convmixer/convmixer-768-32_10xb64_in1k.py",
        {"backbone.arch": {"embed_dims": 32, "depth": 8, "patch_size": 4, "kernel_size": 3}, "head.in_channels": 32},
        32,
    ),
    "poolformer_s12": ("poolformer/poolformer-s12_32xb128_in1k.py", {}, 32),
    "efficientnet_v2_b0": ("efficientnet_v2/efficientnetv2-b0_8xb32_in1k.py", {}, 32),
    "res2net": ("res2net/res2net50-w14-s8_8xb32_in1k.py", {}, 32),
    "timm_resnet18": (
        "resnet/resnet18_8xb16_cifar10.py",
        {"backbone": {"type": "TIMMBackbone", "model_name": "resnet18", "pretrained": False}, "neck": GAP},
        32,
    ),
    "timm_convnext_features_only": (
        "resnet/resnet18_8xb16_cifar10.py",
        {
            "backbone": {
                "type": "TIMMBackbone",
                "model_name": "convnext_atto",
                "features_only": True,
                "out_indices": (3,),
                "pretrained": False,
            },
            "neck": GAP,
            "head.in_channels": 320,
        },
        32,
    ),
    "conformer_tiny": ("conformer/conformer-tiny-p16_8xb128_in1k.py", {}, 64),
    # Plain backprop: reversible backprop computes the layers outside autograd (refused, see the last test).
    "revvit_small": ("revvit/revvit-small_8xb256_in1k.py", {"backbone.no_custom_backward": True}, 64),
    # Found by the exit engine's probe, no names (previously a clear error, or stage_modules=[...] by hand):
    "hrnet_w18_multibranch": ("hrnet/hrnet-w18_4xb32_in1k.py", {}, 64),
    "van_numbered_stages": ("van/van-tiny_8xb128_in1k.py", {}, 64),
}


# Bigger models (ResNet-50 class, DenseNet-121, EfficientNets, Swin) and the slowest builds: tens of seconds each on a
# shared CPU. The fast subset keeps one case per kind of layout (CNN stages, ViT blocks, numbered stages, isotropic).
SLOW = {
    "swin_tiny",
    "shufflenet_v2",
    "timm_resnet18",
    "timm_convnext_features_only",
    "resnet18_in1k",
    "convmixer_isotropic",
    "resnet34_cifar",
    "resnetv1d",
    "resnext50",
    "seresnet50",
    "regnetx_400mf",
    "mobilenet_v2",
    "efficientnet_b0",
    "densenet121",
    "efficientnet_v2_b0",
    "res2net",
    "hrnet_w18_multibranch",
    "conformer_tiny",
    "revvit_small",
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in sorted(CASES)])
def test_family_train_step_and_deepest_inference(case: str) -> None:
    rel, overrides, size = CASES[case]
    model_cfg = load_model_cfg(rel, overrides)
    sd, plain = build_pair(model_cfg)
    assert sd.num_exits >= 2, f"{case}: only {sd.num_exits} exits at {[p.module for p in sd.exit_points]}"

    # One training step: every term is finite, every exit parameter learns.
    sd.train()
    inputs, samples = batch(sd, size)
    losses = sd(inputs, samples, mode="loss")
    expected = {"loss_ce"} | {f"exit{k}_loss_{t}" for k in range(1, sd.num_exits + 1) for t in ("ce", "kd", "hint")}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = exit_param_grads(sd)
    assert grads and all(g > 0 for g in grads.values()), {k: g for k, g in grads.items() if g <= 0}

    # Inference runs the deepest classifier only and equals the plain ImageClassifier.
    # (the training step moved BatchNorm statistics: copy them over first)
    sd.eval()
    plain.eval()
    plain.load_state_dict({k: v for k, v in sd.state_dict().items() if not k.startswith("exit_")}, strict=True)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(sd(x, mode="tensor"), plain(x, mode="tensor"))
        got = sd(x, mode="predict")
        want = plain(x, mode="predict")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.pred_score, b.pred_score)
        assert "exit_scores" not in a


@pytest.mark.parametrize(
    "case, modules",
    [
        ("mobilenet_v2", ["layer2", "layer3", "layer5"]),  # grouped by resolution, stem-level group dropped
        ("convmixer_isotropic", ["stages.1", "stages.3", "stages.5"]),  # one resolution: blocks at 1/4, 2/4, 3/4
        pytest.param("swin_tiny", ["stages.0", "stages.1", "stages.2"], marks=pytest.mark.slow),
        pytest.param(
            "timm_resnet18", ["timm_model.layer1", "timm_model.layer2", "timm_model.layer3"], marks=pytest.mark.slow
        ),
        ("van_numbered_stages", ["norm1", "norm2", "norm3"]),  # block1..4/norm1..4 attributes, no container
        pytest.param("hrnet_w18_multibranch", ["layer1", "stage2", "stage3"], marks=pytest.mark.slow),
        # Dual-branch CNN + transformer: no exit on the stem's maxpool (a stem of single layers carries none).
        pytest.param("conformer_tiny", ["conv_trans_4", "conv_trans_8", "conv_trans_11"], marks=pytest.mark.slow),
        # Two token streams at one resolution are one stage: exits after blocks 3, 6, 9 of 12.
        pytest.param("revvit_small", ["layers.2", "layers.5", "layers.8"], marks=pytest.mark.slow),
    ],
)
def test_exit_placement(case: str, modules: list) -> None:
    from mmpretrain.registry import MODELS

    rel, overrides, _ = CASES[case]
    model = MODELS.build(dict(load_model_cfg(rel, overrides), type="SelfDistillClassifier"))
    assert [p.module for p in model.exit_points] == modules


@pytest.mark.slow
def test_reversible_backbone_trains_its_exits_with_plain_backprop() -> None:
    """RevViT's reversible backprop runs its layers outside autograd: the packaged config is switched to plain
    backprop (warned), which gives the plain reversible model's loss and gradients, and the exits reach the backbone."""
    rel, _, size = CASES["revvit_small"]
    cfg = load_model_cfg(rel)  # the packaged config: reversible backprop
    assert not cfg["backbone"].get("no_custom_backward", False)
    with mock.patch("sd_plugin.mmpretrain_adapter._discovery.print_log") as log:
        sd, plain = build_pair(cfg)
    assert sd.backbone.no_custom_backward and not plain.backbone.no_custom_backward
    (message,), kwargs = log.call_args
    assert message.startswith("RevVisionTransformer: training with plain backprop") and kwargs["level"] == 30
    sd.train()
    plain.train()
    inputs, samples = batch(sd, size)
    torch.manual_seed(0)
    want = plain(inputs, samples, mode="loss")["loss"]
    torch.manual_seed(0)
    losses = sd(inputs, samples, mode="loss")
    assert losses["loss_ce"].item() == want.item()
    want.backward()
    losses["loss_ce"].backward(retain_graph=True)
    for name in ("layers.0.attn.qkv.weight", "layers.5.ffn.layers.0.0.weight", "patch_embed.projection.weight"):
        got_g = sd.backbone.get_parameter(name).grad
        want_g = plain.backbone.get_parameter(name).grad
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-6)  # recomputed vs stored activations
    sd.zero_grad()
    losses["exit1_loss_ce"].backward()
    grad = sd.backbone.layers[0].attn.qkv.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0  # exit 1's loss reaches the first block
    assert sd.backbone.layers[5].attn.qkv.weight.grad is None  # and nothing after its exit point


# Packaged configs as they ship (model dict only, 5 classes), built with the two lines: where the exits land.
# "~" marks a point that cannot hand on fewer samples (later code reshapes with the input's batch size).
PACKAGED_PLACEMENT = {
    "t2t_vit/t2t-vit-t-14_8xb64_in1k.py": ["encoder.3", "encoder.6", "encoder.9"],
    "xcit/xcit-nano-12-p16_8xb128_in1k.py": ["~xca_layers.2", "~xca_layers.5", "~xca_layers.8"],
    "hivit/hivit-tiny-p16_16xb64_in1k.py": ["~blocks.7", "~blocks.10", "~blocks.13"],
    "twins/twins-svt-small_8xb128_in1k.py": ["~stages.0.1", "~stages.1.1", "~stages.2.9"],
    "tnt/tnt-s-p16_16xb64_in1k.py": ["~layers.2", "~layers.5", "~layers.8"],
    "mvit/mvitv2-tiny_8xb256_in1k.py": ["blocks.0", "blocks.2", "blocks.7"],
    "tinyvit/tinyvit-5m_8xb256_in1k.py": ["stages.0", "stages.1"],
    "eva02/eva02-tiny-p14_in1k.py": ["layers.2", "layers.5", "layers.8"],
    "deit3/deit3-small-p16_64xb64_in1k.py": ["layers.2", "layers.5", "layers.8"],
    "mlp_mixer/mlp-mixer-base-p16_64xb64_in1k.py": ["layers.2", "layers.5", "layers.8"],
    "davit/davit-tiny_4xb256_in1k.py": ["stages.0", "stages.1", "stages.2"],
    "swin_transformer_v2/swinv2-tiny-w8_16xb64_in1k-256px.py": ["stages.0", "stages.1", "stages.2"],
    "repmlp/repmlp-base_8xb64_in1k.py": ["stages.0", "stages.1", "stages.2"],
    "hornet/hornet-tiny-gf_8xb128_in1k.py": ["stages.0", "stages.1", "stages.2"],
    "edgenext/edgenext-xxsmall_8xb256_in1k.py": ["stages.0", "stages.1", "stages.2"],
    "efficientformer/efficientformer-l1_8xb128_in1k.py": ["network.0", "network.1", "network.2"],
    "riformer/riformer-s12_8xb128_in1k.py": ["network.0", "network.2", "network.4"],
    "mobilenet_v3/mobilenet-v3-small-050_8xb128_in1k.py": ["layer1", "layer3", "layer8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("rel", sorted(PACKAGED_PLACEMENT))
def test_packaged_config_exit_placement(rel: str) -> None:
    from mmpretrain.registry import MODELS

    model = MODELS.build(dict(load_model_cfg(rel), type="SelfDistillClassifier"))
    got = [("" if p.shrinkable else "~") + p.module for p in model.exit_points]
    assert got == PACKAGED_PLACEMENT[rel]
