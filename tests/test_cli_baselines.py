"""``sd-plugin report --baseline``: plain models scored on the same images and timed beside early exit."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sd_plugin.cli import main
from sd_plugin.cli._baselines import frontier

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "demo_data" / "cifar10_mini"
DEMO_CONFIG = ROOT / "configs" / "demo" / "sd_resnet18-w16_cifar10-mini.py"
ARCH = "test_resnet"
NUM_CLASSES = 10
SIZE = 32


def test_frontier_keeps_only_the_points_nothing_beats():
    points = [
        {"label": "a", "top1": 50.0, "t": 1.0},
        {"label": "b", "top1": 60.0, "t": 2.0},
        {"label": "c", "top1": 55.0, "t": 2.5},  # b is more accurate and faster
        {"label": "d", "top1": 60.0, "t": 3.0},  # as accurate as b, slower
        {"label": "e", "top1": 70.0, "t": 3.0},
        {"label": "f", "top1": 50.0, "t": 1.0},  # ties with a: neither beats the other
    ]
    assert [p["label"] for p in frontier(points, "t")] == ["a", "f", "b", "e"]


def _report(tmp_path, ckpt, *extra):
    argv = ["report", str(ckpt), "--data", str(DATA), "--max-samples", "48", "--batch-size", "16"]
    argv += ["--out-dir", str(tmp_path), "--name", "r", "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((tmp_path / "r.json").read_text())


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    """A wrapped timm model's checkpoint, its own plain model and another plain model, as checkpoints naming
    their architecture."""
    timm = pytest.importorskip("timm")
    import sd_plugin

    out = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    net = sd_plugin.wrap(timm.create_model(ARCH, num_classes=NUM_CLASSES), input_size=(3, SIZE, SIZE))
    with torch.no_grad():  # confident, distinct classifiers
        for name, p in net.named_parameters():
            if "fc." in name:
                p.add_(torch.randn_like(p))
    args = {"num_classes": NUM_CLASSES, "img_size": SIZE}
    torch.save({"arch": ARCH, "state_dict": net.state_dict(), "args": args}, out / "sd.pth")
    plain = sd_plugin.unwrap(copy.deepcopy(net))
    torch.save({"arch": ARCH, "state_dict": plain.state_dict(), "args": {**args, "no_sd": True}}, out / "same.pth")
    torch.manual_seed(1)
    other = timm.create_model(ARCH, num_classes=NUM_CLASSES)
    torch.save({"arch": ARCH, "state_dict": other.state_dict(), "args": {**args, "no_sd": True}}, out / "other.pth")
    return out


@pytest.mark.timm
def test_a_plain_model_is_scored_on_the_same_images_as_the_exits(timm_files, tmp_path):
    """The plain model inside the wrapped one scores exactly what the report's deepest classifier scores, and
    costs the same FLOPs: a baseline fed other images, labels or order would not."""
    same_path, other_path = timm_files / "same.pth", timm_files / "other.pth"
    report = _report(tmp_path, timm_files / "sd.pth", "--baseline", str(same_path), f"other={other_path}")
    deepest = report["exits"][-2]
    same, other = report["baselines"]
    assert (same["top1"], same["top5"]) == (deepest["top1"], deepest["top5"])
    assert same["flops"] == deepest["flops"] and same["params"] == deepest["params"]
    assert other["checkpoint"] == str(other_path) and other["top1"] != same["top1"]
    assert same["name"].startswith("test_resnet (") and other["name"] == "other"
    md = (tmp_path / "r.md").read_text()
    assert "| test_resnet (" in md and "| other |" in md and "frontier" not in report  # no timing: no plane


def test_two_unnamed_baselines_of_one_name_are_refused(timm_files, tmp_path, capsys):
    pytest.importorskip("timm")
    argv = ["report", str(timm_files / "sd.pth"), "--data", str(DATA), "--max-samples", "8", "--no-progress"]
    argv += ["--out-dir", str(tmp_path), "--baseline", str(timm_files / "same.pth"), str(timm_files / "other.pth")]
    assert main(argv) == 1
    assert "share a name" in capsys.readouterr().err


@pytest.mark.timm
def test_timing_puts_exits_early_exit_and_plain_models_on_one_plane(timm_files, tmp_path):
    report = _report(
        tmp_path, timm_files / "sd.pth", "--calib-split", "train", "--calib-samples", "64", "--max-drops", "50",
        "--method", "empirical", "--timing", "--repeats", "1", "--b1-images", "2", "--no-onnx",
        "--baseline", str(timm_files / "other.pth"),
    )  # fmt: skip
    (point,) = report["operating_points"]
    assert point["latency_b1_ms"] > 0 and point["latency_b32_ms"] > 0
    assert report["baselines"][0]["latency_b1_ms"] > 0
    labels = ["exit1", "exit2", "exit3", "deepest", "ensemble", "early exit (empirical, max drop 50.0)"]
    labels.append(f"plain {report['baselines'][0]['name']}")
    for b in ("b1", "b32"):
        assert report["frontier"][b] and set(report["frontier"][b]) <= set(labels)
    md = (tmp_path / "r.md").read_text()
    assert "| early exit (empirical, max drop 50.0) | early exit |" in md and "| plain test_resnet (" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "r_latency.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timm
def test_a_baseline_without_its_architecture_is_refused(timm_files, tmp_path, capsys):
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(timm_files / "other.pth")["state_dict"], bare)
    argv = ["report", str(timm_files / "sd.pth"), "--data", str(DATA), "--max-samples", "8", "--no-progress"]
    assert main([*argv, "--out-dir", str(tmp_path), "--baseline", str(bare)]) == 1
    err = capsys.readouterr().err
    assert "bare.pth" in err and "does not name a timm architecture" in err
    assert main([*argv, "--out-dir", str(tmp_path), "--baseline", str(bare), "--baseline-config", "x.py"]) == 1
    assert "--baseline-config is for MMPretrain" in capsys.readouterr().err


@pytest.mark.timm
@pytest.mark.parametrize(
    ("arch", "args", "message"),
    [
        ("test_efficientnet", {}, "normalises images with mean"),  # ImageNet mean/std, the report model 0.5
        ("vit_tiny_patch16_224", {"img_size": 2 * SIZE}, "does not take the report model's inputs"),  # fixed 64 px
    ],
)
def test_a_timm_baseline_that_takes_other_inputs_is_refused(timm_files, tmp_path, capsys, arch, args, message):
    timm = pytest.importorskip("timm")
    other = timm.create_model(arch, num_classes=NUM_CLASSES, **args)
    path = tmp_path / "other.pth"
    torch.save({"arch": arch, "state_dict": other.state_dict(), "args": {**args, "num_classes": NUM_CLASSES}}, path)
    argv = ["report", str(timm_files / "sd.pth"), "--data", str(DATA), "--max-samples", "8", "--no-progress"]
    assert main([*argv, "--out-dir", str(tmp_path), "--baseline", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "other.pth" in err


@pytest.fixture(scope="module")
def mm_files(tmp_path_factory):
    """An MMPretrain self-distillation checkpoint, a plain config of the same model and its plain checkpoint."""
    pytest.importorskip("mmpretrain")
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    import sd_plugin.mmpretrain_adapter  # noqa: F401

    out = tmp_path_factory.mktemp("mm_baselines")
    cfg = Config.fromfile(str(DEMO_CONFIG))
    cfg.model.setdefault("data_preprocessor", cfg.data_preprocessor)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p))
    torch.save({"state_dict": model.state_dict(), "meta": {}}, out / "sd.pth")
    plain_cfg = out / "plain.py"
    plain_cfg.write_text(
        f"_base_ = [{str(DEMO_CONFIG)!r}]\nmodel = dict(type='ImageClassifier', _scope_='mmpretrain')\n"
    )
    cfg_plain = Config.fromfile(str(plain_cfg))
    cfg_plain.model.setdefault("data_preprocessor", cfg_plain.data_preprocessor)
    plain = MODELS.build(cfg_plain.model)
    keys = plain.state_dict().keys()
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items() if k in keys}}, out / "plain.pth")
    bgr_cfg = out / "bgr.py"
    bgr_cfg.write_text(f"_base_ = [{str(plain_cfg)!r}]\ndata_preprocessor = dict(to_rgb=False)\n")
    return out


@pytest.mark.mmpretrain
def test_an_mmpretrain_plain_model_scores_what_the_deepest_classifier_scores(mm_files, tmp_path, capsys):
    config = ["--config", str(DEMO_CONFIG)]
    report = _report(
        tmp_path, mm_files / "sd.pth", *config, "--baseline", str(mm_files / "plain.pth"),
        "--baseline-config", str(mm_files / "plain.py"),
    )  # fmt: skip
    (row,) = report["baselines"]
    deepest = report["exits"][-2]
    assert row["name"] == "plain" and (row["top1"], row["top5"]) == (deepest["top1"], deepest["top5"])
    assert row["flops"] == deepest["flops"]
    argv = ["report", str(mm_files / "sd.pth"), *config, "--data", str(DATA), "--max-samples", "8", "--no-progress"]
    argv += ["--out-dir", str(tmp_path), "--baseline", str(mm_files / "plain.pth")]
    assert main(argv) == 1
    assert "one --baseline-config per --baseline" in capsys.readouterr().err
    assert main([*argv, "--baseline-config", str(mm_files / "bgr.py")]) == 1
    assert "preprocesses images differently" in capsys.readouterr().err


@pytest.mark.mmpretrain
def test_a_model_with_exits_as_baseline_is_its_deepest_classifier(mm_files, tmp_path):
    """Compared by its deepest classifier alone: its top-1, FLOPs and parameters (the exit heads not counted)."""
    config = ["--config", str(DEMO_CONFIG)]
    report = _report(
        tmp_path, mm_files / "sd.pth", *config, "--baseline", f"self={mm_files / 'sd.pth'}",
        "--baseline-config", str(DEMO_CONFIG),
    )  # fmt: skip
    (row,) = report["baselines"]
    deepest = report["exits"][-2]
    assert (row["top1"], row["flops"], row["params"]) == (deepest["top1"], deepest["flops"], deepest["params"])
