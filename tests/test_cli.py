"""The ``sd-plugin`` command line: help, train, report, calibrate, strip, export, on the checkpoints users have."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_plugin.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "demo_data" / "cifar10_mini"
DEMO_CONFIG = ROOT / "configs" / "demo" / "sd_resnet18-w16_cifar10-mini.py"
ARCH = "test_resnet"
NUM_CLASSES = 10
SUBCOMMANDS = ("train", "train-timm", "report", "calibrate", "strip", "export")
EXIT_SCALES = (4.0, 1.0, 0.25)


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_of_every_command_has_examples(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"] if command else ["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sd-plugin {command or ''}".rstrip())
    assert "examples:" in out and f"sd-plugin {command or 'report'} " in out.split("examples:")[1]
    assert "``" not in out and ":func:" not in out  # docstring markup is not shown


def test_subcommands_are_the_ones_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert tuple(sub.choices) == SUBCOMMANDS


def test_the_local_rank_torch_distributed_launch_puts_first_reaches_train(tmp_path, monkeypatch):
    """``python -m torch.distributed.launch -m sd_plugin train CFG`` runs ``sd_plugin --local-rank=1 train CFG``."""
    from sd_plugin.cli import train

    seen = []
    monkeypatch.setattr(train, "run", lambda args: seen.append((args.local_rank, args.config)) or 0)
    assert main(["--local-rank=1", "train", str(tmp_path / "cfg.py")]) == 0
    assert seen == [(1, str(tmp_path / "cfg.py"))]


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 1
    assert "COMMAND" in capsys.readouterr().out


# --- a timm checkpoint as sd-plugin train-timm writes it -------------------------------------------------------


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """``checkpoint-last.pth`` (and ``model_plain.pth``) written by ``sd-plugin train-timm``'s own save function."""
    pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    import sd_plugin
    from sd_plugin.cli import train_timm

    out = tmp_path_factory.mktemp("train_timm")
    args = train_timm.parse_args([str(DATA), "--model", ARCH, "--img-size", "32", "--output", str(out)])
    torch.manual_seed(0)
    net = sd_plugin.SelfDistillModel(
        train_timm.create_model(args, NUM_CLASSES), train_timm.sd_config(args), (3, 32, 32)
    )
    with torch.no_grad():  # distinct, confident classifiers: untrained ones would all say about the same
        for name, p in net.named_parameters():
            if "fc." in name:
                p.add_(torch.randn_like(p))
    optimizer = create_optimizer_v2(net, opt="sgd", lr=0.1, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1)
    train_timm._save(args, net, optimizer, scheduler, 1, [], None)
    return out, net.eval()


def _report(tmp_path, ckpt, *extra):
    argv = ["report", str(ckpt), "--data", str(DATA), "--max-samples", "32", "--batch-size", "16"]
    argv += ["--out-dir", str(tmp_path), "--name", "r", "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((tmp_path / "r.json").read_text())


@pytest.mark.timm
def test_report_on_a_train_timm_checkpoint(timm_run, tmp_path):
    run, _ = timm_run
    report = _report(
        tmp_path, run / "checkpoint-last.pth", "--calib-split", "train", "--calib-samples", "64",
        "--max-drops", "50", "--method", "empirical",
    )  # fmt: skip
    assert report["model"] == ARCH and report["source"] == "timm"
    rows = report["exits"]
    assert [r["exit"] for r in rows] == ["exit1", "exit2", "exit3", "deepest", "ensemble"]
    assert report["num_samples"] == 32 and report["calib_samples"] == 64
    flops = [r["flops"] for r in rows[:4]]
    params = [r["params"] for r in rows[:4]]
    assert flops == sorted(flops) and params == sorted(params) and rows[3]["flops_fraction"] == 1.0
    # Cross-checks that fail when the bookkeeping is wrong: the shares add up, the average FLOPs are the
    # share-weighted FLOPs of answering at each exit, the calibrated drop keeps to the target on the calibration
    # images, and the ideal speed-up is the plain model's FLOPs over the average.
    (point,) = report["operating_points"]
    test = point["test"]
    shares = [test["exit_share"][k] for k in ("exit1", "exit2", "exit3", "deepest")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert test["flops"] == pytest.approx(sum(s * f for s, f in zip(shares, report["answer_flops"])), rel=1e-9)
    assert point["calibration"]["drop"] <= point["max_drop"] == 50.0 and point["method"] == "empirical"
    assert point["ideal_speedup"] == pytest.approx(rows[3]["flops"] / test["flops"], rel=1e-9)
    fit = report["calibrated_ensemble"]  # weights fitted on the calibration images, scored on the test images
    assert len(fit["weights"]) == 4 and fit["chosen"] in ("fitted", "deepest")
    if fit["chosen"] == "deepest":
        assert fit["top1"] == rows[3]["top1"]
    md = (tmp_path / "r.md").read_text()
    assert "| deepest |" in md and "| ensemble |" in md and "softmax of the mean logits" in md
    # the page states its command, versions, hardware and date once, at the top
    assert md.count("Command: `sd-plugin report ") == 1 and f"torch {importlib.metadata.version('torch')}" in md
    assert "CPU cores" in md and report["date"] in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.timm
@pytest.mark.parametrize("onnx", [True, False])
def test_report_times_the_operating_points_of_both_methods(timm_run, tmp_path, onnx):
    """--timing: measured speed-ups per operating point (eager, ONNX unless --no-onnx) next to the FLOPs-ideal,
    for every --method; the figures are not checked (timings), their presence and bookkeeping are."""
    run, _ = timm_run
    has_onnx = onnx and all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    report = _report(
        tmp_path, run / "checkpoint-last.pth", "--calib-split", "train", "--calib-samples", "64",
        "--max-drops", "50", "--method", "guaranteed", "empirical", "--timing", "--repeats", "1", "--b1-images", "2",
        *([] if onnx else ["--no-onnx"]),
    )  # fmt: skip
    assert report["calib_methods"] == ["guaranteed", "empirical"]
    assert [p["method"] for p in report["operating_points"]] == ["guaranteed", "empirical"]
    assert (report["timing"]["onnx_not_timed"] is None) == has_onnx
    if not onnx:
        assert report["timing"]["onnx_not_timed"] == "--no-onnx"
    backends = ["eager", "onnx"] if has_onnx else ["eager"]
    timed = [p for p in report["operating_points"] if "error" not in p]
    assert timed, report["operating_points"]
    for p in timed:
        speed = {k for k in p if "_speedup_" in k or "_aa_" in k}
        assert speed == {f"{k}_{f}_{b}" for k in backends for f in ("speedup", "aa") for b in ("b1", "b32")}
        assert all(p[k] > 0 for k in speed)
        ratio = p["measured_over_ideal"]
        assert ratio == {f"{k}_{b}": pytest.approx(p[f"{k}_speedup_{b}"] / p["ideal_speedup"]) for k in backends
                         for b in ("b1", "b32")}  # fmt: skip
    md = (tmp_path / "r.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert "| FLOPs-ideal | eager b1 (A/A) | eager b32 (A/A) |" in head and "eager ÷ ideal (b1, b32)" in head
    assert ("ONNX b1 (A/A) | ONNX b32 (A/A) |" in head) == has_onnx and ("ONNX ÷ ideal" in head) == has_onnx
    assert "| guaranteed | 50.0 |" in md and "| empirical | 50.0 |" in md
    assert "A/A: the noise floor" in md


@pytest.mark.timm
def test_report_refuses_to_calibrate_on_the_test_split(timm_run, tmp_path, capsys):
    run, _ = timm_run
    argv = ["report", str(run / "checkpoint-last.pth"), "--data", str(DATA), "--calib-split", "test"]
    assert main(argv) == 1
    assert "fitted figures" in capsys.readouterr().err


@pytest.mark.timm
def test_command_line_module_runs_without_mmpretrain(timm_run, tmp_path):
    """``python -m sd_plugin`` on a timm checkpoint: report, strip and export import neither MMPretrain nor mmcv."""
    run, _ = timm_run
    ckpt = str(run / "checkpoint-last.pth")
    commands = [
        ["report", ckpt, "--data", str(DATA), "--max-samples", "8", "--out-dir", str(tmp_path), "--no-progress"],
        ["strip", ckpt, str(tmp_path / "plain.pth")],
    ]
    code = (
        "import runpy, sys\n"
        f"for argv in {commands!r}:\n"
        "    sys.argv = ['sd-plugin', *argv]\n"
        "    try:\n"
        "        runpy.run_module('sd_plugin', run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, (argv, stop.code)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'mmpretrain', 'mmcv'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "| ensemble |" in proc.stdout


@pytest.mark.timm
def test_calibrate_writes_a_policy_early_exit_accepts(timm_run, tmp_path):
    from sd_plugin.deploy import EarlyExitModel, ExitPolicy

    run, model = timm_run
    path = tmp_path / "policy.json"
    argv = ["calibrate", str(run / "checkpoint-last.pth"), "--data", str(DATA), "--split", "train"]
    argv += ["--max-samples", "64", "--max-drop", "50", "--method", "empirical", "-o", str(path), "--no-progress"]
    assert main(argv) == 0
    policy = ExitPolicy.load(path)
    assert policy.num_exits == 3 and policy.info["method"] == "empirical"
    assert policy.info["calibrated_on"]["num_samples"] == 64 and policy.info["calibration"]["drop"] <= 50
    out = EarlyExitModel(model, policy).eval()(torch.randn(4, 3, 32, 32))
    assert out.logits.shape == (4, NUM_CLASSES) and set(out.exit.tolist()) <= {1, 2, 3, 4}


def test_the_cli_defaults_are_the_library_defaults():
    import inspect

    from sd_plugin.cli import build_parser
    from sd_plugin.deploy import calibrate

    args = build_parser().parse_args(["calibrate", "ckpt.pth", "--data", "d", "--max-drop", "1", "-o", "p.json"])
    params = inspect.signature(calibrate).parameters
    assert (args.method, args.delta) == (params["method"].default, params["delta"].default)
    report = build_parser().parse_args(["report", "ckpt.pth", "--data", "d"])
    assert (report.method, report.delta) == ([params["method"].default], params["delta"].default)


@pytest.mark.timm
def test_strip_gives_the_plain_timm_model(timm_run, tmp_path):
    import timm

    run, _ = timm_run
    assert main(["strip", str(run / "checkpoint-last.pth"), str(tmp_path / "plain.pth")]) == 0
    stripped = torch.load(tmp_path / "plain.pth", weights_only=True)
    assert stripped["meta"]["arch"] == ARCH and stripped["meta"]["sd_plugin_stripped"] is True
    want = torch.load(run / "model_plain.pth", weights_only=True)  # what train-timm saves of the plain model
    assert list(stripped["state_dict"]) == list(want)
    assert all(torch.equal(stripped["state_dict"][k], want[k]) for k in want)
    timm.create_model(ARCH, num_classes=NUM_CLASSES).load_state_dict(stripped["state_dict"], strict=True)


@pytest.mark.timm
def test_export_one_exit_and_the_cascade(timm_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from sd_plugin.deploy import EarlyExitModel, ExitPolicy, OnnxCascade, truncate

    run, model = timm_run
    ckpt = str(run / "checkpoint-last.pth")
    x = torch.randn(5, 3, 32, 32)
    assert main(["export", ckpt, "--exit", "2", "-o", str(tmp_path / "e2.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "e2.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = truncate(model, exit=2)(x)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), want, atol=1e-4, rtol=0)

    with torch.no_grad():
        conf = torch.stack([model.forward_exit(k, f).softmax(-1).amax(-1) for k, f in enumerate(_features(model, x))])
    # Thresholds half-way between two samples' confidences: no sample sits on one (float noise would decide it).
    policy = ExitPolicy([float(c.sort().values[1:3].mean()) for c in conf])
    policy.save(tmp_path / "policy.json")
    argv = ["export", ckpt, "--policy", str(tmp_path / "policy.json"), "-o", str(tmp_path / "cascade")]
    assert main(argv) == 0
    got = OnnxCascade(tmp_path / "cascade")(x.numpy())
    with torch.no_grad():
        ref = EarlyExitModel(model, policy).eval()(x)
    assert got.exit.tolist() == ref.exit.tolist()
    torch.testing.assert_close(torch.from_numpy(got.logits), ref.logits, atol=1e-4, rtol=0)


def _features(model, x):
    from sd_plugin.deploy.early_exit import forward_with_features

    return forward_with_features(model, x)[1]


# --- refusals ------------------------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("command", ["report", "strip"])
def test_a_crafted_checkpoint_is_refused(tmp_path, capsys, command):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, bad, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    argv = ["report", str(bad), "--data", str(DATA)] if command == "report" else ["strip", str(bad), "out.pth"]
    assert main(argv) == 1
    assert not marker.exists()
    assert "error" in capsys.readouterr().err


def test_missing_checkpoint_is_named(tmp_path, capsys):
    assert main(["strip", str(tmp_path / "none.pth"), str(tmp_path / "out.pth")]) == 1
    assert "none.pth" in capsys.readouterr().err


# --- MMPretrain -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_model():
    pytest.importorskip("mmpretrain")
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    import sd_plugin.mmpretrain_adapter  # noqa: F401

    cfg = Config.fromfile(str(DEMO_CONFIG))
    cfg.model.setdefault("data_preprocessor", cfg.data_preprocessor)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    with torch.no_grad():  # exits that disagree with each other and with the deepest classifier
        for heads in (model.exit_heads, model.head):
            for p in heads.parameters():
                p.add_(torch.randn_like(p))
        for scale, head in zip(EXIT_SCALES, model.exit_heads):  # confident shallow exits, hesitant deeper ones
            for p in head.parameters():
                p.mul_(scale)
    return model.eval()


@pytest.mark.mmpretrain
def test_report_and_multi_exit_accuracy_agree(mm_model):
    """The report and MMPretrain's MultiExitAccuracy score every exit and the ensemble the same on one model."""
    from mmpretrain.structures import DataSample

    from sd_plugin.cli.report import ensemble_logits, exit_rows
    from sd_plugin.deploy import ExitLogits, collect_exit_logits
    from sd_plugin.mmpretrain_adapter import MultiExitAccuracy

    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(48, 3, 4, 4, generator=gen) * 255  # smooth colour fields: more varied answers than noise
    images = list(torch.nn.functional.interpolate(coarse, size=32, mode="bilinear").round().to(torch.uint8))
    x = mm_model.data_preprocessor({"inputs": images}, False)["inputs"]
    data = collect_exit_logits(mm_model, [(x, torch.zeros(len(images), dtype=torch.long))])
    ens = ensemble_logits(data)
    # Labels the ensemble gets right: its top-1 is 100 by the library's definition. The mean of the softmaxes
    # picks another class for some of these images, so a report built on it would score below 100.
    mean_softmax = data.logits.softmax(-1).mean(0).argmax(-1)
    assert (mean_softmax != data.logits.mean(0).argmax(-1)).any(), "the images must tell the two definitions apart"
    for labels in (ens.argmax(-1), torch.randint(0, NUM_CLASSES, (len(images),), generator=gen)):
        rows = exit_rows(mm_model, ExitLogits(data.logits, labels), x[:1], None)
        metric = MultiExitAccuracy(topk=(1, 5))
        samples = [DataSample().set_gt_label(int(y)) for y in labels]
        out = mm_model.test_step({"inputs": images, "data_samples": samples})
        metric.process({}, [s.to_dict() for s in out])
        want = metric.compute_metrics(metric.results)
        for row in rows:
            for k in (1, 5):
                assert row[f"top{k}"] == pytest.approx(want[f"{row['exit']}_top{k}"], abs=1e-4), (row["exit"], k)
    assert rows[-1]["exit"] == "ensemble"


@pytest.mark.mmpretrain
def test_mmpretrain_checkpoint_images_match_the_config_pipeline(mm_model, tmp_path):
    """An ImageFolder read for an MMPretrain model gives exactly what the config's own data pipeline gives."""
    ckpt = tmp_path / "sd.pth"
    torch.save({"state_dict": mm_model.state_dict(), "meta": {}}, ckpt)
    config = ["--config", str(DEMO_CONFIG)]
    folder = _report(tmp_path / "a", ckpt, *config)
    argv = ["report", str(ckpt), *config, "--mm-split", "test", "--max-samples", "32", "--batch-size", "16"]
    assert main([*argv, "--out-dir", str(tmp_path / "b"), "--name", "r", "--no-progress"]) == 0
    own = json.loads((tmp_path / "b" / "r.json").read_text())
    assert folder["source"] == own["source"] == "mmpretrain"
    assert [(r["top1"], r["top5"]) for r in folder["exits"]] == [(r["top1"], r["top5"]) for r in own["exits"]]
    assert len({r["top1"] for r in own["exits"]}) > 1  # the exits differ, so the comparison means something
