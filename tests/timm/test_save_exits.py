"""An exit set saved with its options reloads without restating them (``save_exits`` / ``sd_plugin.load_exits``)."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

import sd_plugin  # noqa: E402
from sd_plugin.timm_adapter._saving import CONFIG_NAME, SAFETENSORS_NAME, TORCH_NAME  # noqa: E402

pytestmark = pytest.mark.timm

ROOT = Path(__file__).resolve().parents[2]
CLASSES = 7
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
OPTIONS: dict = dict(
    exit_indices=[0, 2], temperature=4.0, kd_weight=0.5, exit_hidden_ratio=0.5, predict_exit="ensemble"
)


def _model(name: str = "test_resnet", **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=kwargs.pop("num_classes", CLASSES), **kwargs)


def _trained(model: nn.Module, **options: Any) -> sd_plugin.SelfDistillModel:
    """A wrapped model after one optimizer step, so its exits differ from any fresh initialisation."""
    sd_model = sd_plugin.wrap(model, input_size=(3, 32, 32), **options).train()
    optimizer = torch.optim.SGD(sd_model.parameters(), lr=0.1)
    sd_plugin.SelfDistillLoss(sd_model.config)(sd_model(X), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    return sd_model.eval()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch"])
def test_round_trip_restores_options_points_and_weights(tmp_path: Path, safe: bool) -> None:
    sd_model = _trained(_model(), **OPTIONS)
    config_path = sd_model.save_exits(tmp_path / "exits", safe_serialization=safe)
    weights = tmp_path / "exits" / (SAFETENSORS_NAME if safe else TORCH_NAME)
    assert config_path == tmp_path / "exits" / CONFIG_NAME and weights.is_file()

    saved = json.loads(config_path.read_text())
    assert saved["architecture"] == "test_resnet" and saved["num_classes"] == CLASSES
    assert saved["sd_plugin_version"] == sd_plugin.__version__ and saved["weights"] == weights.name
    assert saved["options"] == dict(sd_model.config.to_dict(), exit_indices=[0, 2])
    assert [p["module"] for p in saved["exit_points"]] == ["layer1", "layer3"]
    assert saved["input_size"] == [3, 32, 32]
    if not safe:  # a plain state dict, readable as data alone
        assert set(torch.load(weights, weights_only=True)) == set(sd_model.exits_state_dict())

    plain = _model()
    plain.load_state_dict(sd_plugin.unwrap(copy.deepcopy(sd_model)).state_dict())  # the timm weights it trained
    loaded = sd_plugin.load_exits(plain, tmp_path / "exits")
    assert isinstance(loaded, sd_plugin.SelfDistillModel) and loaded.model is plain
    assert loaded.config == sd_model.config  # every option, with no option restated
    assert loaded.exit_points == sd_model.exit_points
    for key, value in sd_model.exits_state_dict().items():
        assert torch.equal(loaded.exits_state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), sd_model(X))  # the ensemble: every exit took part


def test_runtime_options_can_change_structural_ones_cannot(tmp_path: Path) -> None:
    _trained(_model(), **OPTIONS).save_exits(tmp_path)
    loaded = sd_plugin.load_exits(_model(), tmp_path, predict_exit=1, temperature=2.0)
    assert loaded.config.predict_exit == 1 and loaded.config.temperature == 2.0
    assert loaded.config.exit_hidden_ratio == 0.5 and loaded.num_exits == 2
    with pytest.raises(TypeError, match=r"\['exit_indices'\] it cannot change"):
        sd_plugin.load_exits(_model(), tmp_path, exit_indices=[1])


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet10t", {}, r"trained on 'test_resnet' with 7 classes, but this model has architecture 'resnet10t'"),
        ("test_resnet", dict(num_classes=4), r"but this model has 4 classes, not 7.*num_classes=7\)"),
    ],
    ids=["architecture", "classes"],
)
def test_another_model_is_refused_and_left_as_it_was(tmp_path: Path, name: str, kwargs: Any, match: str) -> None:
    _trained(_model()).save_exits(tmp_path)
    other = _model(name, **kwargs)
    with pytest.raises(ValueError, match=match):
        sd_plugin.load_exits(other, tmp_path)
    assert _hooks(other) == 0


def test_other_create_arguments_are_refused_and_left_as_they_were(tmp_path: Path) -> None:
    vit = dict(img_size=32, depth=8)
    sd_model = sd_plugin.wrap(_model("test_vit", **vit), exit_indices=[1, 3])
    sd_model.save_exits(tmp_path)
    deeper = _model("test_vit", img_size=32, depth=4)  # saved exit index 3 is this model's deepest block
    with pytest.raises(ValueError, match="Create the model as it was"):
        sd_plugin.load_exits(deeper, tmp_path)
    wider = _model("test_vit", **vit, embed_dim=96)  # same exit points, other widths: the weights do not fit
    with pytest.raises(ValueError, match=r"do not fit the exits.*other shapes \['0\.block"):
        sd_plugin.load_exits(wider, tmp_path)
    assert _hooks(deeper) == _hooks(wider) == 0
    assert sd_plugin.load_exits(_model("test_vit", **vit), tmp_path).num_exits == 2


class _Payload:
    """Not data: torch's safe loader must refuse to rebuild it (its code never runs)."""

    def __reduce__(self) -> Any:
        return (print, ("ran code from a checkpoint",))


def test_loading_is_data_only_and_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no sd_plugin_config\.json.*save_exits\(directory\)"):
        sd_plugin.load_exits(_model(), tmp_path)
    sd_model = _trained(_model())
    sd_model.save_exits(tmp_path, safe_serialization=False)
    with pytest.raises(TypeError, match=r"already wrapped: pass sd_plugin\.unwrap\(model\)"):
        sd_plugin.load_exits(sd_model, tmp_path)
    torch.save({"layer": _Payload()}, tmp_path / TORCH_NAME)  # a crafted exits.pth beside a genuine config
    plain = _model()
    with pytest.raises(ValueError, match="builtins.print"):
        sd_plugin.load_exits(plain, tmp_path)
    assert _hooks(plain) == 0
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(config, weights="../elsewhere.pth")))
    with pytest.raises(ValueError, match="names weights '../elsewhere.pth'"):
        sd_plugin.load_exits(_model(), tmp_path)


def test_no_classifier_no_exit_set(tmp_path: Path) -> None:
    sd_model = sd_plugin.wrap(_model(), input_size=(3, 32, 32))
    sd_model.reset_classifier(0)
    with pytest.raises(ValueError, match=r"no classifiers.*reset_classifier\(num_classes\)"):
        sd_model.save_exits(tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


def test_train_timm_writes_the_config_beside_exits_pth(tmp_path: Path) -> None:
    from sd_plugin.cli import train_timm

    sd_model = _trained(_model(), **OPTIONS)
    optimizer = torch.optim.SGD(sd_model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    args = argparse.Namespace(output=str(tmp_path), no_sd=False, model="test_resnet")
    train_timm._save(args, sd_model, optimizer, scheduler, epoch=1, history=[])
    names = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint-last.pth", "model_plain.pth", "exits.pth", "summary.json", CONFIG_NAME} <= names
    assert SAFETENSORS_NAME not in names  # the tool's outputs are otherwise unchanged

    plain = _model()
    plain.load_state_dict(torch.load(tmp_path / "model_plain.pth", weights_only=True))
    loaded = sd_plugin.load_exits(plain, tmp_path)
    assert loaded.config == sd_model.config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), sd_model(X))


def test_load_exits_is_exported_and_import_stays_light() -> None:
    assert "load_exits" in sd_plugin.__all__ and callable(sd_plugin.load_exits)
    code = "import sys, sd_plugin; assert 'timm' not in sys.modules, 'timm imported'; print('LIGHT')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "LIGHT" in proc.stdout, proc.stderr[-2000:]
