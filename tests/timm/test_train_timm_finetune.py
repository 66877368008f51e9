"""``sd-plugin train-timm`` fine-tunes a wrapped ViT-Ti with timm's layer decay and gradient checkpointing (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, List

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models import vision_transformer  # noqa: E402

from sd_plugin.cli import train_timm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "demo_data" / "cifar10_mini"
pytestmark = [pytest.mark.timm, pytest.mark.slow]


def test_vit_tiny_layer_decay_and_grad_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    segments: List[bool] = []
    real = vision_transformer.checkpoint_seq

    def counting(*args: Any, **kwargs: Any) -> Any:
        segments.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(vision_transformer, "checkpoint_seq", counting)
    argv = [
        str(DATA), "--model", "vit_tiny_patch16_224", "--img-size", "32", "--epochs", "1", "-b", "16",
        "--max-train-samples", "64", "--max-val-samples", "32", "--workers", "0", "--no-progress",
        "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--layer-decay", "0.65", "--grad-checkpointing",
        "--output", str(tmp_path),
    ]  # fmt: skip
    assert train_timm.main(argv) == 0
    # every training step (64 / 16) ran the blocks under timm's checkpointing (and validation, without grad)
    assert segments.count(True) == 64 // 16

    (epoch,) = json.loads((tmp_path / "summary.json").read_text())["epochs"]
    assert math.isfinite(epoch["loss"]) and set(epoch["top1"]) >= {"exit1", "exit2", "exit3", "deepest"}
    groups = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["optimizer"]["param_groups"]
    # timm's layer decay on the wrapped ViT-Ti: 12 blocks + embeddings + head = 14 lr scales, each with and
    # without weight decay (28 groups, as on the plain model); the exits are inside those groups
    assert len({g["lr_scale"] for g in groups}) == 14 and len(groups) == 28
    assert max(g["lr_scale"] for g in groups) == 1.0 and min(g["lr_scale"] for g in groups) == pytest.approx(0.65**13)
