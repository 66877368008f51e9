"""wrap() on half precision, channels_last and meta-device timm models, and models whose probe needs care."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import sd_plugin  # noqa: E402

pytestmark = pytest.mark.timm

Y = torch.tensor([0, 1, 2])


def _train_step(sd_model: sd_plugin.SelfDistillModel, x: torch.Tensor) -> None:
    sd_model.train()
    loss = sd_plugin.SelfDistillLoss()(sd_model(x), Y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in sd_model.sd_exits.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_wraps_and_trains(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=7).to(dtype)
    sd_model = sd_plugin.wrap(model, input_size=(3, 32, 32))
    assert [p.module for p in sd_model.exit_points] == ["layer1", "layer2", "layer3"]
    assert all(p.dtype == dtype for p in sd_model.sd_exits.parameters())  # exits follow the model's dtype
    _train_step(sd_model, torch.randn(3, 3, 32, 32).to(dtype))


def test_channels_last_model_keeps_its_outputs() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", num_classes=7).to(memory_format=torch.channels_last)
    sd_model = sd_plugin.wrap(model, input_size=(3, 32, 32))
    x = torch.randn(3, 3, 32, 32).to(memory_format=torch.channels_last)
    _train_step(sd_model, x)
    sd_model.eval()
    with torch.no_grad():
        assert torch.equal(sd_model(x), model(x))


def test_meta_device_model_is_placed_without_computing() -> None:
    with torch.device("meta"):
        model = timm.create_model("test_vit", num_classes=7, img_size=32, depth=8)
    sd_model = sd_plugin.wrap(model)
    assert [p.module for p in sd_model.exit_points] == ["blocks.1", "blocks.3", "blocks.5"]
    assert all(p.is_meta for p in sd_model.parameters())
    sd_model = sd_model.to_empty(device="cpu")
    for p in sd_model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    _train_step(sd_model, torch.randn(3, 3, 32, 32))


@pytest.mark.slow
def test_tresnet_probe_input_channels_come_from_the_data_config() -> None:
    # TResNet's first convolution follows a space-to-depth stem and takes 48 channels, the model 3.
    model = timm.create_model("tresnet_m", num_classes=7)
    sd_model = sd_plugin.wrap(model)
    assert sd_model.input_size == (3, 224, 224)
    assert [p.module for p in sd_model.exit_points] == ["body.layer1", "body.layer2", "body.layer3"]
