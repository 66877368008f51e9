import pytest
import torch
from deploy_toy import check_truncation_and_early_exit, nudged_wrap

timm = pytest.importorskip("timm")
from sd_plugin.cli import main as cli_main  # noqa: E402
from sd_plugin.deploy import (  # noqa: E402
    plain_state_dict,
    strip_checkpoint,
)

pytestmark = pytest.mark.timm

MODELS = {
    "cnn": lambda: timm.create_model("test_resnet", num_classes=7),
    "vit": lambda: timm.create_model(
        "vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=2
    ),
}


def _trained_like(name: str):
    """A wrapped model whose exits and BN statistics are not at their initial values."""
    return nudged_wrap(MODELS[name], scale=0.05, batch=4)


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_strip_round_trip_strict(name, tmp_path):
    model = _trained_like(name)
    x = torch.randn(2, 3, 32, 32)
    torch.save({"state_dict": model.state_dict(), "meta": {"epoch": 3}}, tmp_path / "sd.pth")
    assert cli_main(["strip", str(tmp_path / "sd.pth"), str(tmp_path / "plain.pth")]) == 0
    ckpt = torch.load(tmp_path / "plain.pth", weights_only=True)
    assert ckpt["meta"]["epoch"] == 3 and ckpt["meta"]["sd_plugin_stripped"]
    plain = MODELS[name]().eval()
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), model.forward_deepest(x))
    # A bare state dict (timm style) and the live model give the same keys.
    bare = strip_checkpoint(model.state_dict())
    assert list(bare) == list(ckpt["state_dict"]) == list(plain_state_dict(model))


@torch.no_grad()
@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_truncation_and_early_exit_on_timm(name):
    model = _trained_like(name)
    check_truncation_and_early_exit(model, torch.randn(8, 3, 32, 32))
