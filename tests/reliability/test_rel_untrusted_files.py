"""Files a user may have received from someone else are read as data: a crafted pickle never runs its code.

Each crafted checkpoint holds an object whose ``__reduce__`` calls ``os.system('touch MARKER')``: unpickled with
``weights_only=False`` it creates MARKER. Every entry point must refuse the file with a ValueError that names it,
and MARKER must not exist afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _rel_helpers import raises_documented

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "demo_data" / "cifar10_mini"


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code_ran"


def _crafted(path: Path, marker: Path, **data) -> Path:
    torch.save({**data, "payload": _RunsCode(marker)}, path)
    assert not marker.exists()
    return path


def _refused(err: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    assert str(path) in str(err.value)
    assert "refused" in str(err.value) and "system" in str(err.value)
    assert not marker.exists(), "the crafted file's code ran"


def test_the_crafted_file_does_run_code_when_unpickled(tmp_path, marker):
    """The fixture is live: an unsafe load of it creates the marker (so the tests below can fail)."""
    path = _crafted(tmp_path / "crafted.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_train_timm_resume_loader_refuses_a_crafted_checkpoint(tmp_path, marker):
    pytest.importorskip("timm")
    from sd_plugin.timm_adapter._train_utils import load_resume_checkpoint

    path = _crafted(tmp_path / "checkpoint-last.pth", marker, epoch=1, state_dict={}, optimizer={}, scheduler={})
    with raises_documented("B31", ValueError, match="--resume") as err:
        load_resume_checkpoint(str(path))
    _refused(err, path, marker)


def test_train_timm_initial_checkpoint_refuses_a_crafted_file(tmp_path, marker):
    pytest.importorskip("timm")
    from sd_plugin.timm_adapter._train_utils import create_model

    path = _crafted(tmp_path / "weights.pth", marker, state_dict={})
    args = argparse.Namespace(model="test_resnet", pretrained=False, initial_checkpoint=str(path), img_size=32)
    with pytest.raises(ValueError, match="--initial-checkpoint") as err:
        create_model(args, 10)
    _refused(err, path, marker)


@pytest.mark.slow
def test_train_timm_cli_resume_refuses_a_crafted_checkpoint(tmp_path, marker):
    """The whole tool, as a user runs it: exit code 1 with the message, and no code from the file ran."""
    pytest.importorskip("timm")
    path = _crafted(tmp_path / "checkpoint-last.pth", marker, epoch=1, state_dict={}, optimizer={}, scheduler={})
    cmd = [
        sys.executable, "-m", "sd_plugin", "train-timm", str(DATA), "--model", "test_resnet",
        "--img-size", "32", "--epochs", "1", "-b", "16", "--max-train-samples", "32", "--max-val-samples", "16",
        "--workers", "0", "--no-progress", "--output", str(tmp_path / "out"), "--resume", str(path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "is refused" in proc.stderr and str(path) in proc.stderr
    assert not marker.exists(), "the crafted file's code ran"


def test_strip_checkpoint_refuses_a_crafted_file(tmp_path, marker):
    from sd_plugin.deploy import strip_checkpoint

    path = _crafted(tmp_path / "epoch_1.pth", marker, state_dict={"backbone.w": torch.zeros(1)})
    with raises_documented("B31", ValueError) as err:
        strip_checkpoint(path, tmp_path / "plain.pth")
    _refused(err, path, marker)
    assert not (tmp_path / "plain.pth").exists()


def test_mmengine_load_checkpoint_refuses_a_crafted_file(tmp_path, marker):
    """``load_from`` / ``resume`` go through mmengine's local loader, which sd_plugin scopes; still data only."""
    pytest.importorskip("mmengine")
    from mmengine.runner.checkpoint import CheckpointLoader

    from sd_plugin._safe_globals import install_scoped_mmengine_loader

    install_scoped_mmengine_loader()
    path = _crafted(tmp_path / "epoch_1.pth", marker, state_dict={})
    with raises_documented("B31", ValueError) as err:
        CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    _refused(err, path, marker)


def test_policy_file_that_is_not_json_is_refused(tmp_path, marker):
    from sd_plugin.deploy import ExitPolicy

    path = tmp_path / "policy.json"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with raises_documented("B32", ValueError, match="not an exit policy file") as err:
        ExitPolicy.load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_cascade_manifest_that_is_not_json_is_refused(tmp_path, marker):
    pytest.importorskip("onnxruntime")
    from sd_plugin.deploy import OnnxCascade

    (tmp_path / "cascade.json").write_bytes(pickle.dumps(_RunsCode(marker)))
    with raises_documented("B32", ValueError, match="not an sd_plugin ONNX cascade manifest") as err:
        OnnxCascade(tmp_path)
    assert str(tmp_path / "cascade.json") in str(err.value)
    assert not marker.exists()


def test_cascade_manifest_cannot_name_graphs_outside_its_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    from sd_plugin.deploy import OnnxCascade

    manifest = {
        "format": "sd_plugin.onnx_cascade/1",
        "segments": ["../elsewhere/segment0.onnx"],
        "exits": [],
        "num_exits": 0,
        "thresholds": [],
        "criterion": "max_prob",
    }
    (tmp_path / "cascade.json").write_text(json.dumps(manifest))
    with raises_documented("B33", ValueError, match="bare file name"):
        OnnxCascade(tmp_path)
