import importlib.util
import json
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("matplotlib")
import sd_plugin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("analyze_exits", ROOT / "tools" / "analyze_exits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timm
def test_report_end_to_end(tmp_path):
    model = sd_plugin.wrap(timm.create_model("resnet10t", num_classes=10), input_size=(3, 32, 32))
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "sd.pth")
    report = _tool().main(
        ["--timm-model", "resnet10t", "--checkpoint", str(tmp_path / "sd.pth"), "--num-classes", "10",
         "--img-size", "32", "--data", str(ROOT / "demo_data" / "cifar10_mini"), "--max-samples", "32",
         "--repeats", "1", "--max-drops", "50", "--out-dir", str(tmp_path), "--name", "r"]
    )  # fmt: skip
    assert [r["exit"] for r in report["exits"]] == ["exit 1", "exit 2", "exit 3", "deepest", "ensemble"]
    flops = [r["flops"] for r in report["exits"][:4]]
    assert flops == sorted(flops) and report["exits"][3]["flops_fraction"] == 1.0
    point = report["operating_points"][0]
    assert point["calibration"]["drop"] <= 50 and point["speedup_b1"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == 32
    assert (tmp_path / "r.png").stat().st_size > 0 and "| deepest |" in (tmp_path / "r.md").read_text()
