"""wrap + a training step + exact eval / unwrap equality over many timm architectures (small inputs)."""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

import pytest
import torch

timm = pytest.importorskip("timm")

import sd_plugin  # noqa: E402
from sd_plugin.core import ExitPoint  # noqa: E402

pytestmark = pytest.mark.timm

# (architecture, create_model kwargs, input size): the smallest variants, at 32-64 px.
FAST = [
    ("test_resnet", {}, 32),
    ("resnet10t", {}, 32),
    ("seresnet18", {}, 32),
    ("resnext26ts", {}, 32),
    ("regnetx_002", {}, 32),
    ("test_efficientnet", {}, 32),
    ("mobilenetv3_small_050", {}, 32),
    ("mobilenetv4_conv_small_035", {}, 32),
    ("test_convnext", {}, 32),
    ("efficientformerv2_s0", dict(img_size=64), 64),
    ("densenet121", dict(growth_rate=8, block_config=(2, 2, 2, 2)), 32),
    ("dla46_c", {}, 32),
    ("dpn48b", {}, 32),
    ("cs3darknet_focus_s", {}, 32),
    ("test_vit", dict(img_size=32), 32),
    ("deit_tiny_patch16_224", dict(img_size=32, depth=4), 32),
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=2, depths=(1, 1, 1, 1)), 64),
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=4), 28),
    ("beit_base_patch16_224", dict(img_size=32, depth=4, embed_dim=64, num_heads=2), 32),
    ("test_maxvit", dict(img_size=64), 64),
    ("test_coatnet", dict(img_size=64), 64),
    ("poolformer_s12", {}, 32),
    ("mixer_s16_224", dict(img_size=32), 32),
    ("ghostnet_050", {}, 32),
    ("lcnet_050", {}, 32),
    ("rexnet_100", {}, 32),
    ("test_nfnet", {}, 32),
    ("test_byobnet", {}, 32),
    ("test_mambaout", {}, 32),
    ("levit_128s", dict(img_size=64), 64),
    ("pvt_v2_b0", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("efficientvit_b0", {}, 64),
    ("pit_ti_224", dict(img_size=64), 64),
    ("visformer_tiny", dict(img_size=64), 64),
    ("starnet_s050", {}, 32),
    ("inception_next_atto", {}, 64),
    ("cait_xxs24_224", dict(img_size=32, depth=4), 32),
    ("xcit_nano_12_p16_224", dict(img_size=32, depth=4), 32),
    ("gcvit_xxtiny", dict(img_size=64), 64),
    ("resnetv2_18", {}, 32),
    ("ese_vovnet19b_slim_dw", {}, 32),
    ("mobilenetv2_050", {}, 32),
    ("hardcorenas_a", {}, 32),
]

SLOW = [
    ("repvit_m0_9", {}, 64),
    ("hrnet_w18_small", {}, 64),
    ("mobileone_s0", {}, 32),
    ("fastvit_t8", {}, 64),
    ("hgnetv2_b0", {}, 64),
    ("efficientformer_l1", {}, 224),
    ("tiny_vit_5m_224", {}, 224),
    ("convmixer_768_32", {}, 32),
    ("vgg11", {}, 32),
    ("inception_v3", {}, 75),
    ("legacy_xception", {}, 64),
    ("resnext50_32x4d", {}, 32),
    ("convnext_tiny", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("vit_tiny_patch16_224", {}, 224),
    ("swin_tiny_patch4_window7_224", {}, 224),
    ("maxvit_nano_rw_256", dict(img_size=64), 64),
    ("coatnet_nano_rw_224", dict(img_size=64), 64),
    # modules first covered by tools/coverage_timm.py (seeded sample + one per module), at its 64 px
    ("coat_lite_tiny", dict(img_size=64), 64),
    ("cpubone_nano", {}, 64),
    ("crossvit_9_dagger_240", {}, 64),
    ("cspnext_tiny", {}, 64),
    ("efficientvit_m1", dict(img_size=64), 64),
]


def _build(name: str, kwargs: Dict[str, Any], size: int) -> Tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    return model, torch.randn(2, 3, size, size)


def _check(name: str, kwargs: Dict[str, Any], size: int) -> None:
    model, x = _build(name, kwargs, size)
    model.eval()
    with torch.no_grad():
        before = model(x)
    keys_before = list(model.state_dict())
    state_before = copy.deepcopy(model.state_dict())

    sd_model = sd_plugin.wrap(model, input_size=(3, size, size))
    assert isinstance(sd_model, sd_plugin.SelfDistillModel)
    assert sd_model.num_exits >= 1
    assert all(isinstance(p, ExitPoint) for p in sd_model.exit_points)

    sd_model.train()
    out = sd_model(x)
    assert isinstance(out, sd_plugin.SelfDistillOutput)
    assert out.logits.shape == (2, 5)
    assert all(lg.shape == (2, 5) for lg in out.exit_logits)
    assert all(f.shape == out.features.shape == (2, sd_model.feature_dim) for f in out.exit_features)
    loss = sd_plugin.SelfDistillLoss()(out, torch.tensor([0, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in sd_model.sd_exits.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: exit parameter {pname} got no gradient"

    # the training step changed only batch-norm statistics; restore them to compare outputs exactly
    sd_model.unwrap().load_state_dict(state_before)
    sd_model.eval()
    with torch.no_grad():
        wrapped = sd_model(x)
        assert torch.equal(wrapped, before)
        plain = sd_plugin.unwrap(sd_model)
        assert plain is model
        assert list(plain.state_dict()) == keys_before
        assert torch.equal(plain(x), before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules()), (
        f"{name}: hooks left on the unwrapped model"
    )


@pytest.mark.parametrize("name, kwargs, size", FAST, ids=[a[0] for a in FAST])
def test_architecture(name: str, kwargs: Dict[str, Any], size: int) -> None:
    _check(name, kwargs, size)


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, size", SLOW, ids=[a[0] for a in SLOW])
def test_architecture_full_size(name: str, kwargs: Dict[str, Any], size: int) -> None:
    _check(name, kwargs, size)


def test_enough_families() -> None:
    families = {timm.models.model_entrypoint(n).__module__ for n, _, _ in FAST}
    assert len(FAST) >= 40 and len(families) >= 25, (len(FAST), sorted(families))


@pytest.mark.slow
def test_feature_info_off_the_main_path_falls_back_to_the_probe() -> None:
    # timm's feature_info for xception41 names an activation inside a residual branch ('blocks.1.stack.act3'),
    # which no exit can read; the engine then finds the stage ends from the probe's own call trace.
    model, _ = _build("xception41", {}, 64)
    names = [d["module"] for d in model.feature_info]
    assert "blocks.1.stack.act3" in names
    sd_model = sd_plugin.wrap(model, input_size=(3, 64, 64))
    assert [p.module for p in sd_model.exit_points] == ["blocks.0", "blocks.1", "blocks.10"]
    assert not any(p.module in names for p in sd_model.exit_points[1:])
