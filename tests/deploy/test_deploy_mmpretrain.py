import logging
from types import SimpleNamespace

import pytest
import torch
from deploy_toy import check_truncation_and_early_exit

pytest.importorskip("mmpretrain")
from mmpretrain.registry import HOOKS, MODELS  # noqa: E402

import sd_plugin  # noqa: E402, F401  (registers SelfDistillClassifier)
from sd_plugin.cli import main as cli_main  # noqa: E402
from sd_plugin.mmpretrain_adapter.save_stripped_checkpoint_hook import SaveStrippedCheckpointHook  # noqa: E402

pytestmark = pytest.mark.mmpretrain

CONFIGS = {
    "cnn": dict(
        backbone=dict(type="ResNet", depth=18, stem_channels=16, base_channels=16, out_indices=(3,)),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=5, in_channels=128, loss=dict(type="CrossEntropyLoss")),
    ),
    "vit": dict(
        backbone=dict(
            type="VisionTransformer",
            arch=dict(embed_dims=48, num_layers=4, num_heads=2, feedforward_channels=96),
            img_size=32,
            patch_size=8,
        ),
        head=dict(type="VisionTransformerClsHead", num_classes=5, in_channels=48),
    ),
}


def _sd_model(name: str):
    torch.manual_seed(0)
    model = MODELS.build(dict(type="SelfDistillClassifier", **CONFIGS[name]))
    with torch.no_grad():
        for key in ("exit_necks", "exit_heads"):
            for p in getattr(model, key).parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.train()
        model.extract_feat(torch.randn(4, 3, 32, 32))  # BN statistics away from their initial values
    return model.eval()


def _plain(name: str):
    return MODELS.build(dict(type="ImageClassifier", **CONFIGS[name])).eval()


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_strip_round_trip_strict(name, tmp_path):
    model = _sd_model(name)
    x = torch.randn(2, 3, 32, 32)
    torch.save(
        {
            "meta": {"epoch": 2, "dataset_meta": {"classes": list("abcde")}},
            "state_dict": model.state_dict(),
            "optimizer": {"state": {}},
        },
        tmp_path / "epoch_2.pth",
    )
    cfg = tmp_path / "plain_cfg.py"
    cfg.write_text(f"model = dict(type='ImageClassifier', **{CONFIGS[name]!r})\n")
    assert (
        cli_main(["strip", str(tmp_path / "epoch_2.pth"), str(tmp_path / "plain.pth"), "--check-config", str(cfg)]) == 0
    )
    ckpt = torch.load(tmp_path / "plain.pth", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"} and ckpt["meta"]["dataset_meta"]["classes"] == list("abcde")
    plain = _plain(name)
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x, mode="tensor"), model.forward_deepest(x))


def test_hook_refuses_a_plain_model_and_an_empty_suffix(tmp_path):
    """Bad use of the hook. What it writes, with a real Runner and save_best, is checked in
    tests/reliability/test_rel_stripped_hook.py."""
    assert HOOKS.get("SaveStrippedCheckpointHook") is SaveStrippedCheckpointHook
    runner = SimpleNamespace(model=_plain("cnn"), rank=0, logger=logging.getLogger("t"), work_dir=str(tmp_path))
    checkpoint = {"meta": {"epoch": 1}, "state_dict": runner.model.state_dict()}
    with pytest.raises(TypeError, match="self-distillation model"):
        SaveStrippedCheckpointHook().before_save_checkpoint(runner, checkpoint)
    with pytest.raises(ValueError, match="suffix"):
        SaveStrippedCheckpointHook(suffix="")


@torch.no_grad()
@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_truncation_and_early_exit_on_mmpretrain(name):
    model = _sd_model(name)
    check_truncation_and_early_exit(model, torch.randn(6, 3, 32, 32))
