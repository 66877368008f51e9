"""The bad-input catalogue (docs/errors.md): every mistake gives an error that names it, before training starts.

Each test id (``B01`` ...) is the row of the catalogue in docs/errors.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
import torch.nn as nn
from _rel_helpers import (
    documented_messages,
    make_image_folder,
    mm_config,
    raises_documented,
    sd_resnet,
    tiny_resnet,
    write_config,
)
from _rel_run import load_tool, run_mm_inprocess

import sd_plugin

# --------------------------------------------------------------------------------------------- shared fixtures

TIMM_ARGS = [
    "--model",
    "test_resnet",
    "--img-size",
    "32",
    "-b",
    "4",
    "--workers",
    "0",
    "--epochs",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def timm_model() -> Callable[..., nn.Module]:
    timm = pytest.importorskip("timm")
    return lambda **kw: timm.create_model("test_resnet", **{"num_classes": 5, **kw})


def _wrap(model: nn.Module, **options: Any) -> nn.Module:
    return sd_plugin.wrap(model, input_size=(3, 32, 32), **options)


def _build_mm(**overrides: Any) -> nn.Module:
    from mmpretrain.registry import MODELS

    cfg: Dict[str, Any] = sd_resnet(num_classes=5)
    cfg.update(overrides)
    return MODELS.build(cfg)


def _mm_loss(model: nn.Module, x: torch.Tensor, labels: list) -> Dict[str, torch.Tensor]:
    from mmpretrain.structures import DataSample

    return model.loss(x, [DataSample().set_gt_label(lb) for lb in labels])


# ------------------------------------------------------------------- options: same checks on both routes

OPTION_CASES = [
    ("B03", dict(exit_indices=[7]), ValueError, r"exit index 7 is out of range.*valid exit indices are 0\.\.2"),
    ("B04", dict(exit_indices=[0.5]), TypeError, r"exit_indices must hold ints"),
    ("B04", dict(exit_indices="0,1"), TypeError, r"exit_indices must be a list of ints"),
    ("B05", dict(temperature=0), ValueError, r"temperature must be > 0"),
    ("B05", dict(temperature=-2.0), ValueError, r"temperature must be > 0"),
    ("B06", dict(kd_weight=-1), ValueError, r"kd_weight must be a finite number >= 0"),
    ("B06", dict(hint_weight=float("nan")), ValueError, r"hint_weight must be a finite number"),
    ("B07", dict(ce_weight="0.7"), TypeError, r"ce_weight must be a number"),
    ("B08", dict(predict_exit=9), ValueError, r"predict_exit=9"),
    ("B08", dict(predict_exit="last"), ValueError, r"predict_exit must be 'deepest', 'ensemble'"),
]
OPTION_IDS = [f"{c[0]}-{list(c[1])[0]}" for c in OPTION_CASES]


@pytest.mark.timm
@pytest.mark.parametrize("row, options, exc, pattern", OPTION_CASES, ids=OPTION_IDS)
def test_bad_option_timm(timm_model, row, options, exc, pattern):
    with raises_documented(row, exc, match=pattern):
        _wrap(timm_model(), **options)


@pytest.mark.mmpretrain
@pytest.mark.parametrize("row, options, exc, pattern", OPTION_CASES, ids=OPTION_IDS)
def test_bad_option_mmpretrain(row, options, exc, pattern):
    with raises_documented(row, exc, match=pattern):
        _build_mm(**options)


@pytest.mark.timm
def test_B02_unknown_option_timm(timm_model):
    with raises_documented("B02", TypeError, match=r"unknown option\(s\) \['tempreature'\]; valid options"):
        _wrap(timm_model(), tempreature=3.0)


@pytest.mark.mmpretrain
def test_B02_unknown_option_or_selfsup_config_mmpretrain():
    with raises_documented(
        "B02", TypeError, match=r"unexpected options \['queue_len'\].*supervised classification config"
    ):
        _build_mm(queue_len=4096)


# ------------------------------------------------------------------------------------------ the model itself


@pytest.mark.timm
def test_B01_not_a_model():
    with raises_documented("B01", TypeError, match=r"wrap\(\) needs a timm model \(torch.nn.Module\), got str"):
        sd_plugin.wrap("resnet18")


@pytest.mark.timm
def test_B11_wrapped_twice(timm_model):
    with raises_documented("B11", TypeError, match="already wrapped"):
        sd_plugin.wrap(_wrap(timm_model()))


@pytest.mark.timm
def test_B09_no_classifier_timm(timm_model):
    with raises_documented("B09", ValueError, match=r"num_classes=0 \(no classifier\).*num_classes > 0"):
        _wrap(timm_model(num_classes=0))


@pytest.mark.mmpretrain
def test_B09_no_classifier_mmpretrain():
    with raises_documented("B09", ValueError, match=r"needs a classification head"):
        _build_mm(head=None)


@pytest.mark.timm
def test_B10_single_output_model_timm():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    with raises_documented("B10", TypeError, match=r"Sequential is not a timm classifier.*pass a timm model"):
        _wrap(flat)


@pytest.mark.mmpretrain
def test_B10_single_output_backbone_mmpretrain():
    from mmpretrain.registry import MODELS

    class OneShotBackbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 64)

        def forward(self, x: torch.Tensor) -> tuple:
            return (self.proj(x.mean((2, 3))),)

    MODELS.register_module("RelOneShotBackbone", module=OneShotBackbone, force=True)
    with raises_documented("B10", ValueError, match=r"cannot find where to put exits in backbone .*stage_modules="):
        _build_mm(backbone=dict(type="RelOneShotBackbone"), neck=None)


@pytest.mark.mmpretrain
def test_B23_head_width_does_not_match_backbone_mmpretrain():
    head = dict(type="LinearClsHead", num_classes=5, in_channels=32, loss=dict(type="CrossEntropyLoss"))
    with raises_documented("B23", ValueError, match=r"in_channels=32.*64"):
        _build_mm(head=head)


# ------------------------------------------------------------------------------------ data seen in training


@pytest.mark.timm
def test_B12_labels_out_of_range_timm(timm_model):
    model = _wrap(timm_model())
    with raises_documented("B12", ValueError, match=r"labels must lie in \[0, 4\] for 5 classes.*check num_classes"):
        sd_plugin.SelfDistillLoss()(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 5]))


@pytest.mark.mmpretrain
@pytest.mark.parametrize("labels", [[0, 5], [-1, 0]])
def test_B12_labels_out_of_range_mmpretrain(labels):
    with raises_documented("B12", ValueError, match=r"labels must lie in \[0, 4\] for 5 classes.*num_classes"):
        _mm_loss(_build_mm(), torch.randn(2, 3, 32, 32), labels)


@pytest.mark.timm
def test_B13_loss_on_eval_output(timm_model):
    model = _wrap(timm_model()).eval()
    with raises_documented("B13", TypeError, match=r"needs the wrapped model's training output.*train mode"):
        sd_plugin.SelfDistillLoss()(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))


def _with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 0, 3, 3] = float("nan")
    return x


@pytest.mark.timm
def test_B15_nan_in_input_timm(timm_model):
    model = _wrap(timm_model())
    with raises_documented("B15", ValueError, match=r"input batch contains NaN or inf"):
        model(_with_nan(torch.randn(2, 3, 32, 32)))


@pytest.mark.mmpretrain
def test_B15_nan_in_input_mmpretrain():
    with raises_documented("B15", ValueError, match=r"input batch contains NaN or inf"):
        _mm_loss(_build_mm(), _with_nan(torch.randn(2, 3, 32, 32)), [0, 1])


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.timm
def test_B14_checkpoint_of_another_model_timm(timm_model):
    model = _wrap(timm_model())
    with raises_documented(
        "B14", RuntimeError, match=r"size mismatch for model.fc.weight: .*shape torch.Size\(\[7, 96\]\)"
    ):
        model.load_state_dict(timm_model(num_classes=7).state_dict(), strict=False)


@pytest.mark.mmpretrain
def test_B14_checkpoint_of_another_model_mmpretrain():
    from mmpretrain.registry import MODELS

    other = MODELS.build(tiny_resnet(num_classes=7)).state_dict()
    with raises_documented("B14", RuntimeError, match=r"size mismatch for head.fc.weight"):
        _build_mm().load_state_dict(other, strict=False)


@pytest.mark.timm
def test_B18_resume_from_a_plain_checkpoint_timm(tmp_path, timm_model):
    torch.save(timm_model(num_classes=2).state_dict(), tmp_path / "plain.pth")
    data = make_image_folder(tmp_path / "d" / "train")
    make_image_folder(tmp_path / "d" / "val", per_class=2)
    args = [str(data.parent), *TIMM_ARGS, "--output", str(tmp_path / "out"), "--resume", str(tmp_path / "plain.pth")]
    with raises_documented("B18", ValueError, match=r"not a checkpoint of sd-plugin train-timm.*--initial-checkpoint"):
        load_tool("train_timm").main(args)


@pytest.mark.mmpretrain
def test_B18_resume_from_a_missing_file_mmpretrain(tmp_path):
    cfg = write_config(mm_config(tmp_path / "data", tmp_path / "wd"), tmp_path / "c.py")
    with raises_documented("B18", ValueError, match=r"--resume .*no such checkpoint file"):
        run_mm_inprocess(cfg, "--resume", str(tmp_path / "nope.pth"), name="b18")


@pytest.mark.mmpretrain
def test_B19_missing_config_file(tmp_path):
    with raises_documented("B19", ValueError, match=r"config file .* does not exist"):
        load_tool("train").main([str(tmp_path / "no_such_config.py")])


# ---------------------------------------------------------------------------------------- data set folders


@pytest.mark.mmpretrain
def test_B16_empty_data_folder_mmpretrain(tmp_path):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    cfg = write_config(mm_config(tmp_path / "empty", tmp_path / "wd"), tmp_path / "c.py")
    with raises_documented(
        "B16", RuntimeError, match=re.escape(f"Found 0 files in subfolders of: {{'img_path': '{tmp_path}")
    ):
        run_mm_inprocess(cfg, name="b16")


@pytest.mark.timm
def test_B16_empty_data_folder_timm(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "class0").mkdir(parents=True)
    with raises_documented("B16", RuntimeError, match=r"Found 0 images in subfolders of .*train"):
        load_tool("train_timm").main([str(tmp_path), "--model", "test_resnet", "--output", str(tmp_path / "out")])


def _corrupt(root: Path) -> Path:
    bad = root / "class0" / "003.png"
    bad.write_bytes(b"this is not a PNG")
    return bad


@pytest.mark.mmpretrain
def test_B17_corrupt_image_mmpretrain(tmp_path):
    bad = _corrupt(make_image_folder(tmp_path / "data"))
    cfg = write_config(mm_config(tmp_path / "data", tmp_path / "wd", max_iters=4), tmp_path / "c.py")
    with raises_documented("B17", AssertionError, match=re.escape(f"failed to load image: {bad}")):
        run_mm_inprocess(cfg, name="b17")


@pytest.mark.slow
@pytest.mark.timm
def test_B17_corrupt_image_is_skipped_with_a_warning_timm(tmp_path, caplog):
    bad = _corrupt(make_image_folder(tmp_path / "train"))
    make_image_folder(tmp_path / "val", per_class=2)
    load_tool("train_timm").main([str(tmp_path), *TIMM_ARGS, "--output", str(tmp_path / "out")])
    assert any("Skipped sample" in r.getMessage() and str(bad) in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "checkpoint-last.pth").is_file()


@pytest.mark.timm
def test_B28_fewer_classes_than_the_data_set_timm(tmp_path):
    make_image_folder(tmp_path / "train", num_classes=3, per_class=4)
    make_image_folder(tmp_path / "val", num_classes=3, per_class=1)
    args = [str(tmp_path), *TIMM_ARGS, "--num-classes", "2", "--output", str(tmp_path / "out")]
    with raises_documented("B28", ValueError, match=r"labels must lie in \[0, 1\] for 2 classes.*check num_classes"):
        load_tool("train_timm").main(args)


@pytest.mark.mmpretrain
def test_B24_resume_from_a_truncated_checkpoint_mmpretrain(tmp_path):
    from sd_plugin._io import atomic_save

    atomic_save({"state_dict": {"w": torch.zeros(4096)}}, tmp_path / "iter_2.pth")
    data = (tmp_path / "iter_2.pth").read_bytes()
    (tmp_path / "iter_2.pth").write_bytes(data[: len(data) // 3])  # what a crash during a plain torch.save leaves
    cfg = write_config(mm_config(tmp_path / "data", tmp_path / "wd"), tmp_path / "c.py")
    with raises_documented(
        "B24", ValueError, match=r"--resume .*iter_2.pth' is truncated.*Use the checkpoint before it"
    ):
        run_mm_inprocess(cfg, "--resume", str(tmp_path / "iter_2.pth"), name="b24")


# Rows whose mistake raises nothing on purpose (what the user sees is checked by the row's tests).
NOT_RAISING = {
    "B25": "sd-plugin train fixes the config (persistent_workers=False)",
    "B26": "the atomic writers keep the previous checkpoint",
}


def test_catalogue_in_docs_matches_the_tests():
    """Every row of docs/errors.md names tests that exist and that check its message; README gives the count.

    Each row's tests raise through ``raises_documented(row, ...)``, which compares the real error with the
    row's message, so a changed message fails its test until the row is updated.
    """
    here = Path(__file__).resolve().parent
    doc = (here.parents[1] / "docs" / "errors.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (B\d\d) \|.*\| ([^|]*) \|$", doc, re.M)}
    assert len(rows) >= 15
    source = "\n".join(p.read_text() for p in here.glob("test_rel_*.py"))
    defined = set(re.findall(r"^def (test_\w+)", source, re.M))
    option_rows = {c[0] for c in OPTION_CASES}
    for row, cell in rows.items():
        names = [(n, star) for n, py, star in re.findall(r"(test_\w+)(\.py)?(\*?)", cell) if not py]
        assert names, f"row {row} names no test"
        for name, star in names:
            ok = any(d.startswith(name) for d in defined) if star else name in defined
            ok = ok or (name.startswith("test_bad_option") and row in option_rows)
            assert ok, f"row {row}: no test {name}{star}"
        if row in NOT_RAISING:
            continue
        assert documented_messages(row), f"row {row} shows no `Type: message`"
        checked = row in option_rows or re.search(rf'raises_documented\(\s*"{row}"|\("{row}", lambda', source)
        checked = checked or (row in ("B24", "B30") and '"B24" if how == "truncated" else "B30"' in source)
        assert checked, f"row {row}: no test checks its message with raises_documented"
    tested = set(re.findall(r"^def test_(B\d\d)_", source, re.M)) | option_rows
    assert tested <= set(rows), f"tests without a row in docs/errors.md: {sorted(tested - set(rows))}"
    readme = (here.parents[1] / "README.md").read_text()
    counts = re.findall(r"(\d+)\s+kinds\s+of\s+bad\s+input", readme)
    assert counts == [str(len(rows))], f"README says {counts} kinds of bad input, docs/errors.md has {len(rows)} rows"


def test_B34_calibration_set_too_small_for_the_target():
    # With 200 held-out samples even exits that never err are bounded by no less than 1 - 0.1 ** (1 / 200) = 1.1
    # points at delta = 0.1 (Clopper-Pearson, all 200 used): no early exit is certified within half a point, and the
    # error says what the data does support and how many samples the target needs.
    from sd_plugin.deploy import calibrate
    from sd_plugin.deploy.calibrate import ExitLogits

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 10, (200,), generator=g)
    logits = torch.randn(4, 200, 10, generator=g) + 8 * nn.functional.one_hot(targets, 10)  # every exit right
    with raises_documented("B34", ValueError) as err:
        calibrate(ExitLogits(logits, targets), max_drop=0.5)
    smallest, needed = re.search(
        r"certifies is about ([0-9.]+).* at least about (\d+) calibration", str(err.value)
    ).groups()
    assert float(smallest) > 100 * (1 - 0.1 ** (1 / 200)) and int(needed) > 200
    assert calibrate(ExitLogits(logits, targets), max_drop=0.5, method="empirical").num_exits == 3
