"""timm route through ``sd-plugin train-timm``: resume, bfloat16 autocast, plain checkpoints, torchrun DDP.

Model: timm's ``test_resnet`` (4 stages, 3 exits) on 32 px images, 16 training images, batch 4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from _rel_helpers import SimulatedCrash, make_image_folder
from _rel_run import PYTHON, TRAIN_TIMM, load_tool, max_abs_diff, run_cmd, torchrun

pytestmark = pytest.mark.timm

BASE = ["--model", "test_resnet", "--img-size", "32", "-b", "4", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tdata")
    make_image_folder(root / "train", num_classes=2, per_class=8)
    make_image_folder(root / "val", num_classes=2, per_class=2, seed=1)
    return root


def _train(data: Path, out: Path, *args: str, tool: Any = None) -> None:
    """``sd-plugin train-timm`` in this process, on one thread (a fixed float summation order, so runs compare)."""
    tool = tool or load_tool("train_timm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tool.main([str(data), *BASE, "--output", str(out), *args])
    finally:
        torch.set_num_threads(threads)


def _ckpt(out: Path) -> Dict[str, Any]:
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)


def _summary(out: Path) -> List[Dict[str, Any]]:
    return json.loads((out / "summary.json").read_text())["epochs"]


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, data_root, monkeypatch):
    """2 epochs in one go == 1 epoch, crash, ``--resume checkpoint-last.pth``, 1 more (cosine lr, augmentation)."""
    _train(data_root, tmp_path / "full", "--epochs", "2")

    tool = load_tool("train_timm")
    calls = {"n": 0}
    real = tool.train_one_epoch

    def crash_on_second_epoch(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise SimulatedCrash("simulated crash at the start of epoch 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(tool, "train_one_epoch", crash_on_second_epoch)
    with pytest.raises(SimulatedCrash):
        _train(data_root, tmp_path / "part", "--epochs", "2", tool=tool)
    assert _ckpt(tmp_path / "part")["epoch"] == 1
    _train(data_root, tmp_path / "part", "--epochs", "2", "--resume", str(tmp_path / "part" / "checkpoint-last.pth"))

    full, part = _ckpt(tmp_path / "full"), _ckpt(tmp_path / "part")
    assert part["epoch"] == 2
    assert [h["loss"] for h in _summary(tmp_path / "part")] == pytest.approx(
        [h["loss"] for h in _summary(tmp_path / "full")]
    )
    assert max_abs_diff(full["state_dict"], part["state_dict"]) == 0.0
    assert any(k.startswith("sd_exits.") for k in part["state_dict"])
    moms_full = [s["momentum_buffer"] for s in full["optimizer"]["state"].values()]
    moms_part = [s["momentum_buffer"] for s in part["optimizer"]["state"].values()]
    n_params = sum(len(g["params"]) for g in full["optimizer"]["param_groups"])
    assert len(moms_full) == len(moms_part) == n_params  # every parameter, the exits' included, has its state
    assert all(torch.equal(a, b) for a, b in zip(moms_full, moms_part))
    assert full["scheduler"] == part["scheduler"]


def test_amp_bfloat16_short_run_is_finite(tmp_path, data_root):
    _train(data_root, tmp_path / "amp", "--epochs", "1", "--amp")
    (epoch,) = _summary(tmp_path / "amp")
    values = [epoch["loss"], *epoch["terms"].values()]
    assert len(values) == 1 + 1 + 3 * 3 and all(math.isfinite(v) for v in values)
    assert all(torch.isfinite(v).all() for v in _ckpt(tmp_path / "amp")["state_dict"].values() if v.is_floating_point())


def test_plain_timm_checkpoint_starts_the_exits_fresh_and_says_so(tmp_path, data_root, capsys):
    import timm

    torch.manual_seed(123)
    plain = timm.create_model("test_resnet", num_classes=2)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    frozen = ["--epochs", "1", "--lr", "0", "--weight-decay", "0"]
    _train(data_root, tmp_path / "fresh", *frozen)
    _train(data_root, tmp_path / "init", *frozen, "--initial-checkpoint", str(tmp_path / "plain.pth"))
    out = capsys.readouterr().out

    loaded = torch.load(tmp_path / "init" / "model_plain.pth", weights_only=True)
    params = dict(plain.named_parameters())
    assert max_abs_diff({k: loaded[k] for k in params}, {k: v.detach() for k, v in params.items()}) == 0.0
    fresh = {k: v for k, v in torch.load(tmp_path / "fresh" / "exits.pth", weights_only=True).items()}
    init = {k: v for k, v in torch.load(tmp_path / "init" / "exits.pth", weights_only=True).items()}
    weights = [k for k in fresh if k.endswith("weight") and "running" not in k]
    assert max_abs_diff({k: fresh[k] for k in weights}, {k: init[k] for k in weights}) == 0.0
    assert "exits start from their initialisation" in out and "plain.pth" in out


@pytest.mark.slow
def test_torchrun_ddp_on_cpu_with_amp(tmp_path, data_root):
    """2 gloo ranks, DDP without find_unused_parameters, bfloat16 autocast: the epoch completes, finite loss."""
    proc = torchrun(*TRAIN_TIMM, str(data_root), *BASE, "--epochs", "1", "--amp", "--output", str(tmp_path / "ddp"))
    assert "world size 2" in proc.stdout
    (epoch,) = _summary(tmp_path / "ddp")
    assert epoch["steps"] == 16 // (2 * 4) and math.isfinite(epoch["loss"])
    per_rank = epoch["loss_per_rank"]  # the reported loss is the mean over the ranks' shards, not rank 0's
    assert len(per_rank) == 2 and per_rank[0] != per_rank[1]
    assert epoch["loss"] == pytest.approx(sum(per_rank) / 2, rel=1e-12)


@pytest.mark.slow
def test_ddp_of_a_wrapped_model_equals_accumulation_over_the_same_halves(tmp_path):
    """The tool's DDP wrapper (gloo, 2 ranks, broadcast_buffers=True) vs one process accumulating the two halves.

    ``_rel_ddp_timm.py``: 3 SGD steps of ``sd_plugin.wrap(test_resnet)``. BatchNorm sees each half's statistics in
    both runs, so parameters and per-half losses must agree (tolerance 1e-6; on CPU they are bitwise equal); rank
    0's BN buffers equal the reference's rank-0-only running statistics.
    """
    script = "tests/reliability/_rel_ddp_timm.py"
    torchrun(script, str(tmp_path))
    run_cmd([PYTHON, script, str(tmp_path), "--reference"])
    rank0, rank1, ref = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("rank0", "rank1", "reference"))
    assert max_abs_diff(rank0["params"], rank1["params"]) == 0.0
    assert max_abs_diff(rank0["params"], ref["params"]) < 1e-6
    assert rank0["buffers"].keys() == ref["buffers"].keys() and len(ref["buffers"]) > 0
    assert max_abs_diff(rank0["buffers"], ref["buffers"]) < 1e-6
    assert any(k.startswith("sd_exits.") for k in ref["params"])
    per_rank = [v for a, b in zip(rank0["losses"], rank1["losses"]) for v in (a[0], b[0])]
    assert per_rank == pytest.approx([v for step in ref["losses"] for v in step], rel=1e-6)
    assert len(per_rank) == 6 and all(math.isfinite(v) for v in per_rank)
