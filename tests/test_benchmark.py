"""tools/benchmark.py: arms, data subsets, table maths, interleaved timing, FLOPs, and (slow) --quick end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.nn as nn

from tools import benchmark
from tools.bench import arms as _bench_arms
from tools.bench import cost as _bench_cost
from tools.bench import data as _bench_data
from tools.bench import report as _bench_report

REPO = Path(__file__).resolve().parent.parent

MINI = REPO / "demo_data" / "cifar10_mini"


# ---------------------------------------------------------------------------------------------------- data subsets
def test_subsets_are_stratified_fixed_and_nested(tmp_path: Path) -> None:
    a = _bench_data.write_subsets(MINI, tmp_path / "a", num_train=100, num_test=60, num_val=20)
    b = _bench_data.write_subsets(MINI, tmp_path / "b", num_train=100, num_test=60, num_val=20)
    assert (a.num_train, a.num_test, a.num_val) == (100, 60, 20)
    train = a.read("train")
    per_class = [sum(1 for _, y in train if y == c) for c in range(len(a.classes))]
    assert per_class == [10] * 10
    assert all(p.is_file() for p, _ in train[:5])
    # Same draw every time (both arms, every seed read the same files); val is part of test.
    assert a.train_ann.read_text() == b.train_ann.read_text()
    assert set(a.read("val")) <= set(a.read("test"))
    # Labels follow the sorted class folders.
    path, label = a.read("test")[0]
    assert path.parent.name == a.classes[label]


def test_subset_none_takes_whole_split(tmp_path: Path) -> None:
    splits = _bench_data.write_subsets(MINI, tmp_path, num_train=None, num_test=None)
    on_disk = sum(1 for _ in (MINI / "test").glob("*/*.jpg"))
    assert splits.num_test == on_disk == splits.num_val


def test_subset_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tar -xzf"):
        _bench_data.write_subsets(tmp_path / "missing", tmp_path, 100, 100)
    with pytest.raises(ValueError, match="cannot hold all 10 classes"):
        _bench_data.write_subsets(MINI, tmp_path, num_train=5, num_test=None)
    with pytest.raises(ValueError, match="num_test must be a positive int"):
        _bench_data.write_subsets(MINI, tmp_path, num_train=100, num_test=0)


def test_cli_missing_data_root_explains_extraction(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = benchmark.main(["--quick", "--data-root", str(tmp_path / "nope"), "--work-dir", str(tmp_path / "w")])
    assert rc == 2
    assert "cifar10_jpg.tar.gz" in capsys.readouterr().err


def test_cli_rejects_contradictory_options() -> None:
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--no-train", "--no-cost"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--seeds", "1", "1"])
    args = benchmark.parse_args(["--quick"])
    assert args.seeds == [0] and args.epochs == 1 and args.name == "benchmark_mmpretrain_quick"


# ------------------------------------------------------------------------------------------------------ table maths
def test_exit_accuracies_reads_both_metric_styles() -> None:
    mm = {
        "multi-exit/exit1_top1": 50.0,
        "multi-exit/exit2_top1": 60.0,
        "multi-exit/deepest_top1": 70.0,
        "multi-exit/ensemble_top1": 72.0,
        "multi-exit/deepest_top5": 99.0,
    }
    assert _bench_report.exit_accuracies(mm) == {"exit1": 50.0, "exit2": 60.0, "deepest": 70.0, "ensemble": 72.0}
    assert _bench_report.exit_accuracies({"accuracy/top1": 81.5, "epoch": 3}) == {"deepest": 81.5}


def _runs(ce: List[float], deepest: List[float]) -> List[Dict[str, Any]]:
    runs = []
    for seed, (p, d) in enumerate(zip(ce, deepest)):
        runs.append({"arm": "ce", "seed": seed, "history": [{"epoch": 1, "accuracy/top1": p}], "test": {}})
        sd = {"exit1/top1": d - 20, "exit2/top1": d - 10, "deepest/top1": d, "ensemble/top1": d + 1}
        runs.append({"arm": "byot", "seed": seed, "history": [{"epoch": 1, **sd}], "test": {}})
        alone = {"multi-exit/deepest_top1": p + 1, "multi-exit/ensemble_top1": p + 1}  # no exits: ensemble = deepest
        runs.append({"arm": "pskd", "seed": seed, "history": [], "test": alone})
    return runs


def test_arm_results_gain_and_error_reduction_vs_ce() -> None:
    ce, deepest = [80.0, 78.0], [82.0, 79.0]
    acc = _bench_report.arm_results(_runs(ce, deepest), ["ce", "byot", "pskd"])
    assert acc["seeds"] == [0, 1]
    rows = {r["arm"]: r for r in acc["arms"]}
    assert list(rows["byot"]["top1"]) == ["exit1", "exit2", "deepest", "ensemble"]
    assert list(rows["pskd"]["top1"]) == ["deepest"]  # an arm without exits has no ensemble
    gain = rows["byot"]["deepest_gain_vs_ce"]
    assert gain["per_seed"] == pytest.approx([d - p for p, d in zip(ce, deepest)])
    assert gain["mean"] == pytest.approx(sum(gain["per_seed"]) / 2)
    red = rows["byot"]["deepest_error_reduction_vs_ce"]["per_seed"]
    assert red == pytest.approx([100 * (d - p) / (100 - p) for p, d in zip(ce, deepest)])
    ens = rows["byot"]["ensemble_error_reduction_vs_ce"]["per_seed"]
    assert ens == pytest.approx([100 * (d + 1 - p) / (100 - p) for p, d in zip(ce, deepest)])
    assert rows["ce"]["deepest_gain_vs_ce"]["per_seed"] == [0.0, 0.0]
    table = _bench_report.render_markdown(acc, None, {"title": "t", "recipe": "r"})
    assert "| byot | 80.50 ± 2.12 (82.00, 79.00) |" in table


def test_arm_results_keep_only_seeds_every_arm_finished() -> None:
    runs = [r for r in _runs([80.0, 70.0], [81.0, 71.0]) if not (r["arm"] == "pskd" and r["seed"] == 1)]
    acc = _bench_report.arm_results(runs, ["ce", "byot", "pskd"])
    assert acc["seeds"] == [0]


def test_arm_names_parse_into_recipes() -> None:
    r = _bench_arms.parse_arm("byot+ls")
    assert r.exits and r.label_smoothing == 0.1 and r.options == {}
    p = _bench_arms.parse_arm("pskd+ls")
    assert not p.exits and p.pskd and p.options == {"pskd_alpha": 0.8, "exit_indices": []}
    assert _bench_arms.parse_arm("cskd").class_pairs
    assert not _bench_arms.parse_arm("ls").self_distill_model
    c = _bench_arms.parse_arm("byot+cutmix+ls")
    assert c.exits and c.batch_augment == "cutmix" and c.label_smoothing == 0.1
    assert _bench_arms.parse_arm("mixup").batch_augment == "mixup" and not _bench_arms.parse_arm("mixup").exits
    for bad in ("ce+ls", "byot+byotrms", "mixsd", "ls+ls", "mixup+cutmix", "sd"):
        with pytest.raises(ValueError, match="arm"):
            _bench_arms.parse_arm(bad)
    args = benchmark.parse_args(["--arms", "byot", "ls"])
    assert args.arms == ["ce", "byot", "ls"]  # the baseline is always measured
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--arms", "byot", "byot"])  # a duplicate


def test_batch_augment_arms_use_the_frameworks_own_augments(tmp_path: Path) -> None:
    """MMPretrain: ``train_cfg.augments`` (its data preprocessor mixes) and soft-target CE on the head."""
    from tools.bench.data import DataSplits
    from tools.bench.mmpretrain_route import arm_spec

    ann = tmp_path / "ann.txt"
    splits = DataSplits(tmp_path, ("a", "b"), ann, ann, ann, num_train=2, num_val=2, num_test=2)
    over = arm_spec("byot+cutmix", splits, epochs=1, seed=0, work_dir=tmp_path)["overrides"]
    assert over["model.train_cfg"] == {"augments": [{"type": "CutMix", "alpha": _bench_arms.MIX_ALPHA}]}
    assert over["model.head.loss"]["use_soft"] is True
    over = arm_spec("mixup+ls", splits, epochs=1, seed=0, work_dir=tmp_path)["overrides"]
    assert over["model.train_cfg"]["augments"][0]["type"] == "Mixup"
    assert over["model.head.loss"]["type"] == "LabelSmoothLoss"  # smoothing applied to the mixed targets
    assert "model.train_cfg" not in arm_spec("byot", splits, epochs=1, seed=0, work_dir=tmp_path)["overrides"]


def test_sd_option_reaches_every_arm_with_exits_and_only_those(tmp_path: Path) -> None:
    from tools.bench.data import DataSplits
    from tools.bench.mmpretrain_route import arm_spec

    args = benchmark.parse_args(["--sd-option", "exit_hidden_ratio=0.125", "--sd-option", "predict_exit=ensemble"])
    options = dict(args.sd_option)
    assert options == {"exit_hidden_ratio": 0.125, "predict_exit": "ensemble"}
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--sd-option", "hidden=0.1"])
    ann = tmp_path / "ann.txt"
    splits = DataSplits(tmp_path, ("a", "b"), ann, ann, ann, num_train=2, num_val=2, num_test=2)
    over = arm_spec("byot", splits, 1, 0, tmp_path, sd_options=options)["overrides"]
    assert over["model.exit_hidden_ratio"] == 0.125 and over["model.predict_exit"] == "ensemble"
    assert "model.exit_hidden_ratio" not in arm_spec("ce", splits, 1, 0, tmp_path, sd_options=options)["overrides"]


# ----------------------------------------------------------------------------------------------- cost measurement
def _arm(name: str, log: List[str]) -> _bench_cost.TrainArm:
    return _bench_cost.TrainArm(
        name=name, model=nn.Linear(2, 2), step=lambda b: log.append(f"{name}:{b}"), infer=lambda b: log.append(name)
    )


def test_interleaved_times_alternate_abba_on_identical_batches() -> None:
    log: List[str] = []
    arms = [_arm("plain", log), _arm("sd", log)]
    times = _bench_cost.interleaved_times(arms, batches=["b0", "b1"], rounds=3, warmup=1, mode="train")
    assert log == ["plain:b0", "sd:b0", "sd:b1", "plain:b1", "plain:b0", "sd:b0", "sd:b1", "plain:b1"]
    assert {k: len(v) for k, v in times.items()} == {"plain": 3, "sd": 3}
    with pytest.raises(ValueError, match="mode"):
        _bench_cost.interleaved_times(arms, ["b0"], rounds=1, warmup=0, mode="eval")


@pytest.mark.timm
def test_exit_flops_counts_exits_on_top_of_the_unchanged_model() -> None:
    timm = pytest.importorskip("timm")
    import sd_plugin

    plain = timm.create_model("resnet18", num_classes=10, channels=(8, 16, 32, 64), stem_width=8)
    sd = sd_plugin.wrap(timm.create_model("resnet18", num_classes=10, channels=(8, 16, 32, 64), stem_width=8))
    out = _bench_cost.exit_flops(plain, plain, sd, torch.randn(2, 3, 32, 32))
    assert out["sd_deepest_gflops_per_image"] == pytest.approx(out["plain_gflops_per_image"])
    assert len(out["exit_gflops_per_image"]) == sd.num_exits == 3
    assert all(f > 0 for f in out["exit_gflops_per_image"])
    expected = 1 + sum(out["exit_gflops_per_image"]) / out["plain_gflops_per_image"]
    assert out["flops_ratio"] == pytest.approx(expected)
    assert sd.training and plain.training  # modes restored


def test_exit_flops_rejects_models_without_exits() -> None:
    m = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="MultiExitModel"):
        _bench_cost.exit_flops(m, m, m, torch.randn(1, 4))


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize(
    "route, arms",
    [
        pytest.param(
            "mmpretrain", ["ce", "byot+ls", "pskd", "cskd", "tfkd", "byot+cutmix"], marks=pytest.mark.mmpretrain
        ),
        pytest.param("timm", ["ce", "byot", "tfkd+ls", "mixup"], marks=pytest.mark.timm),
    ],
)
def test_quick_run_writes_every_arm(route: str, arms: List[str], tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tools.benchmark",
        "--route",
        route,
        "--quick",
        "--arms",
        *arms,
        "--data-root",
        str(REPO / "demo_data" / "cifar10_mini"),
        "--out-dir",
        str(tmp_path),
        "--figure-dir",
        str(tmp_path),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = f"benchmark_{route}_quick"
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    png = tmp_path / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["arm"]: r for r in payload["accuracy"]["arms"]}
    assert list(rows) == arms
    for arm, row in rows.items():
        has_exits = arm.startswith("byot")
        assert ("exit3" in row["top1"]) == has_exits and ("ensemble" in row["top1"]) == has_exits
        assert "deepest_error_reduction_vs_ce" in row
    cost = payload["cost"]
    for key in ("train_step", "peak_memory", "flops"):
        assert set(cost[key]["ratio_vs_ce"]) == set(arms) and cost[key]["ratio_vs_ce"]["ce"] == pytest.approx(1.0)
    exit_arm = [a for a in arms if a.startswith("byot")][0]
    assert cost["flops"]["ratio_vs_ce"][exit_arm] > 1.0
    assert all(cost["flops"]["ratio_vs_ce"][a] == pytest.approx(1.0) for a in arms if not a.startswith("byot"))
    table = (tmp_path / f"{name}.md").read_text()
    for arm in arms:
        assert f"| {arm} |" in table
    assert table in proc.stdout  # the printed table is the saved one


def test_calibration_subset_is_held_out_and_leaves_the_others_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    for split, n in (("train", 30), ("test", 6)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                (root / split / c / f"{i:04d}.jpg").write_bytes(b"")
    plain = _bench_data.write_subsets(root, tmp_path / "p", 20, None)
    with_calib = _bench_data.write_subsets(root, tmp_path / "c", 20, None, num_calib=10)
    assert plain.train_ann.read_text() == with_calib.train_ann.read_text()
    calib = (tmp_path / "c" / "calib_subset.txt").read_text().splitlines()
    train = set(with_calib.train_ann.read_text().splitlines())
    assert len(calib) == 10 and not set(calib) & train
    assert sorted(line.split()[1] for line in calib) == ["0"] * 5 + ["1"] * 5
    _bench_data.write_subsets(root, tmp_path / "x", 60, None, num_calib=10)  # nothing left: no calibration file
    assert not (tmp_path / "x" / "calib_subset.txt").exists()
