"""Exact resume as users train: shuffling, random augmentation, two data-loader workers, validation every epoch.

N epochs in one go == N-1 epochs, a crash, ``--resume``, the last epoch: bitwise-equal weights and momentum,
on both routes. MMPretrain: ``sd-plugin train`` (``RNGStateHook`` on by default; persistent workers, as
MMPretrain's script sets them). timm: ``sd-plugin train-timm`` (timm's training transform and Mixup).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _rel_helpers import SimulatedCrash, augmented_epoch_config, make_image_folder, sd_resnet, tiny_resnet, write_config
from _rel_run import load_tool, losses_of, max_abs_diff, probe, run_mm_inprocess

MODELS = {"plain": tiny_resnet, "selfdistill": sd_resnet}


def _momenta(optim_state: dict) -> list:
    return [s["momentum_buffer"] for s in optim_state["state"].values()]


def _assert_same_momenta(a: list, b: list, n_params: int) -> None:
    assert len(a) == len(b) == n_params  # every parameter, the exits' included, has its state on both sides
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.mmpretrain
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_mm_resume_with_shuffle_augmentation_and_workers_is_exact(tmp_path, kind):
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8)
    common = dict(data_root=data, model=MODELS[kind](), max_epochs=2, num_workers=2)
    full = write_config(augmented_epoch_config(work_dir=tmp_path / "full", **common), tmp_path / "full.py")
    crash = write_config(
        augmented_epoch_config(work_dir=tmp_path / "part", crash_after_epoch=1, **common), tmp_path / "crash.py"
    )
    part = write_config(augmented_epoch_config(work_dir=tmp_path / "part", **common), tmp_path / "part.py")
    run_mm_inprocess(full, name=f"xr_full_{kind}")
    with pytest.raises(SimulatedCrash):
        run_mm_inprocess(crash, name=f"xr_crash_{kind}")
    run_mm_inprocess(part, "--resume", name=f"xr_resumed_{kind}")
    a, b = probe(tmp_path / "full"), probe(tmp_path / "part")

    assert [r["iter"] for r in b["records"]] == [r["iter"] for r in a["records"][4:]] == [4, 5, 6, 7]
    assert losses_of(b) == losses_of(a)[4:]
    assert max_abs_diff(a["params"], b["params"]) == 0.0
    _assert_same_momenta(_momenta(a["optim"]), _momenta(b["optim"]), len(a["params"]))
    log = next((tmp_path / "full").glob("*/*.log")).read_text()
    assert "restarting the persistent data-loader workers" in log  # persistent workers were in play


TIMM_BASE = ["--model", "test_resnet", "--img-size", "32", "-b", "4", "--workers", "2", "--no-progress"]


def _train_timm(tool: Any, data: Path, out: Path, *args: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tool.main([str(data), *TIMM_BASE, "--output", str(out), *args])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.timm
def test_timm_resume_with_shuffle_augmentation_mixup_and_workers_is_exact(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_image_folder(data / "train", num_classes=2, per_class=8)
    make_image_folder(data / "val", num_classes=2, per_class=2, seed=1)
    recipe = ["--epochs", "2", "--mixup", "0.2"]
    _train_timm(load_tool("train_timm"), data, tmp_path / "full", *recipe)

    tool = load_tool("train_timm")
    real, calls = tool.train_one_epoch, {"n": 0}

    def crash_on_second_epoch(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise SimulatedCrash("simulated crash at the start of epoch 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(tool, "train_one_epoch", crash_on_second_epoch)
    with pytest.raises(SimulatedCrash):
        _train_timm(tool, data, tmp_path / "part", *recipe)
    resume = ["--resume", str(tmp_path / "part" / "checkpoint-last.pth")]
    _train_timm(load_tool("train_timm"), data, tmp_path / "part", *recipe, *resume)

    load = lambda out: torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)  # noqa: E731
    full, part = load(tmp_path / "full"), load(tmp_path / "part")
    summary = lambda out: json.loads((out / "summary.json").read_text())["epochs"]  # noqa: E731
    assert [h["loss"] for h in summary(tmp_path / "part")] == [h["loss"] for h in summary(tmp_path / "full")]
    assert max_abs_diff(full["state_dict"], part["state_dict"]) == 0.0
    n_params = sum(len(g["params"]) for g in full["optimizer"]["param_groups"])
    _assert_same_momenta(_momenta(full["optimizer"]), _momenta(part["optimizer"]), n_params)
