import json
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("matplotlib")
pytest.importorskip("onnxruntime")
import sd_plugin  # noqa: E402
from tools import analyze_exits  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timm
def test_report_end_to_end(tmp_path):
    model = sd_plugin.wrap(timm.create_model("resnet10t", num_classes=10), input_size=(3, 32, 32))
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "sd.pth")
    report = analyze_exits.main(
        ["--timm-model", "resnet10t", "--checkpoint", str(tmp_path / "sd.pth"), "--num-classes", "10",
         "--img-size", "32", "--data", str(ROOT / "demo_data" / "cifar10_mini"), "--max-samples", "32",
         "--calib-split", "train", "--calib-samples", "48", "--repeats", "1", "--b1-images", "4", "--max-drops", "2",
         "--out-dir", str(tmp_path), "--name", "r"]
    )  # fmt: skip
    assert [r["exit"] for r in report["exits"]] == ["exit1", "exit2", "exit3", "deepest", "ensemble"]
    flops = [r["flops"] for r in report["exits"][:4]]
    assert flops == sorted(flops) and report["exits"][3]["flops_fraction"] == 1.0
    assert report["num_samples"] == 32 and report["calib_samples"] == 48
    point = report["operating_points"][0]
    assert point["calibration"]["num_samples"] == 48 and point["test"]["num_samples"] == 32
    assert list(point["test"]["exit_share"]) == ["exit1", "exit2", "exit3", "deepest"]
    assert point["speedup_b1"] > 0 and point["onnx_speedup_b32"] > 0 and point["ideal_speedup"] >= 1 / 1.2
    # Cross-checks that fail when the tool's bookkeeping is wrong: the shares add up, the average cost is the
    # share-weighted cost of answering at each exit, the calibrated drop keeps to the limit on the calibration
    # data, and the ideal speed-up is the plain model's FLOPs over that cost.
    test = point["test"]
    shares = [test["exit_share"][k] for k in ("exit1", "exit2", "exit3", "deepest")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert test["flops"] == pytest.approx(sum(s * f for s, f in zip(shares, report["answer_flops"])), rel=1e-9)
    assert point["calibration"]["drop"] <= point["max_drop"] == 2.0
    assert point["ideal_speedup"] == pytest.approx(report["exits"][3]["flops"] / test["flops"], rel=1e-9)
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == 32
    assert (tmp_path / "r.png").stat().st_size > 0 and "| deepest |" in (tmp_path / "r.md").read_text()


def test_refuses_to_calibrate_on_the_test_split():
    with pytest.raises(SystemExit):
        analyze_exits.parse_args(
            ["--timm-model", "resnet10t", "--checkpoint", "x.pth", "--num-classes", "10", "--img-size", "32",
             "--data", "d", "--split", "test", "--calib-split", "test"]
        )  # fmt: skip
