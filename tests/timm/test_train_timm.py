"""``sd-plugin train-timm`` end to end on a CIFAR-10 subset (slow: a real, if tiny, training run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

import sd_plugin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "demo_data" / "cifar10_mini"
pytestmark = [pytest.mark.timm, pytest.mark.slow]


def _train(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "sd_plugin", "train-timm", str(DATA), "--model", "test_resnet",
        "--img-size", "32", "--epochs", "1", "-b", "32", "--max-train-samples", "128", "--max-val-samples", "64",
        "--workers", "0", "--no-progress", "--output", str(tmp_path), *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)


def test_train_one_epoch_writes_table_and_checkpoints(tmp_path: Path) -> None:
    proc = _train(tmp_path, "--mixup", "0.2", "--amp")
    header = next(line for line in proc.stdout.splitlines() if line.startswith("epoch |"))
    assert header.split("|")[1:] and [c.strip() for c in header.split("|")[1:]] == [
        "exit1", "exit2", "exit3", "deepest", "ensemble",
    ]  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    (epoch,) = summary["epochs"]
    assert set(epoch["top1"]) == {"exit1", "exit2", "exit3", "deepest", "ensemble"}
    assert len(epoch["step_times"]) == 128 // 32

    plain = timm.create_model("test_resnet", num_classes=10)
    plain.load_state_dict(torch.load(tmp_path / "model_plain.pth", weights_only=True), strict=True)
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert any(k.startswith("sd_exits.") for k in ckpt["state_dict"])
    assert set(torch.load(tmp_path / "exits.pth", weights_only=True)) == {
        k[len("sd_exits.") :] for k in ckpt["state_dict"] if k.startswith("sd_exits.")
    }
    assert sd_plugin.load_exits(plain, tmp_path).num_exits == 3  # sd_plugin_config.json beside exits.pth

    # --resume continues from the saved epoch with the saved optimizer and scheduler
    _train(tmp_path, "--resume", str(tmp_path / "checkpoint-last.pth"), "--epochs", "2")
    epochs = json.loads((tmp_path / "summary.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[0] == epoch


def test_no_sd_baseline(tmp_path: Path) -> None:
    proc = _train(tmp_path, "--no-sd")
    header = next(line for line in proc.stdout.splitlines() if line.startswith("epoch |"))
    assert [c.strip() for c in header.split("|")[1:]] == ["deepest"]
    timm.create_model("test_resnet", num_classes=10).load_state_dict(
        torch.load(tmp_path / "model_plain.pth", weights_only=True), strict=True
    )
    assert not (tmp_path / "exits.pth").exists() and not (tmp_path / "sd_plugin_config.json").exists()
