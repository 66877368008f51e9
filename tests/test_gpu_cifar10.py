"""CPU smoke run of the GPU benchmark script (tools/gpu_cifar10.py): it trains, evaluates and writes its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytestmark = [pytest.mark.slow, pytest.mark.timm]

REPO = Path(__file__).resolve().parents[1]


def test_augment_crops_and_flips_every_sample_on_its_own():
    from tools.gpu_cifar10 import PAD, augment

    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    y = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (PAD,) * 4)
    crops = lambda i: [padded[i, :, a : a + 8, b : b + 8] for a in range(2 * PAD + 1) for b in range(2 * PAD + 1)]  # noqa: E731
    flipped = 0
    for i in range(16):
        plain = any(torch.equal(c, y[i]) for c in crops(i))
        mirror = any(torch.equal(c.flip(2), y[i]) for c in crops(i))
        assert plain or mirror
        flipped += mirror and not plain
    assert 0 < flipped < 16


def test_cpu_smoke_run_writes_table_json_and_plot(tmp_path):
    from tools import gpu_cifar10

    rc = gpu_cifar10.main(
        [str(REPO / "demo_data" / "cifar10_mini"), "--device", "cpu", "--epochs", "1", "--max-train", "128",
         "--batch-size", "64", "--arms", "ce", "byot", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    payload = json.loads((tmp_path / "gpu_cifar10.json").read_text())
    rows = {r["arm"]: r["top1"] for r in payload["arms"]}
    assert set(rows["ce"]) == {"deepest"}
    assert set(rows["byot"]) == {"exit1", "exit2", "exit3", "deepest", "ensemble"}
    assert payload["meta"]["device"] == "CPU" and payload["meta"]["train_images"] == 128
    assert all(0 <= v <= 100 for r in rows.values() for v in r.values())
    assert "| byot |" in (tmp_path / "gpu_cifar10.md").read_text()
    assert (tmp_path / "gpu_cifar10.png").read_bytes()[:4] == b"\x89PNG"
