"""MMPretrain route through ``sd-plugin train``: CPU DDP, bfloat16 autocast, resume, old plain checkpoints.

The model is a ResNet-18 layout with 8 base channels on 32 px images, either a plain ``ImageClassifier`` or
the same config with ``type='SelfDistillClassifier'`` (two exits' worth of extra parameters and loss terms).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _rel_helpers import make_image_folder, mm_config, raises_documented, sd_resnet, tiny_resnet, write_config
from _rel_run import TRAIN, load_tool, losses_of, max_abs_diff, probe, run_mm_inprocess, torchrun

pytestmark = pytest.mark.mmpretrain

MODELS = {"plain": tiny_resnet, "selfdistill": sd_resnet}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), num_classes=2, per_class=8)


def _write(tmp_path: Path, name: str, **kwargs: object) -> Path:
    cfg = mm_config(work_dir=tmp_path / name, **kwargs)  # type: ignore[arg-type]
    return write_config(cfg, tmp_path / f"{name}.py")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cpu_ddp_matches_single_process_over_the_same_global_batch(tmp_path, data_root, kind):
    """2 gloo ranks x batch 2 for 3 steps == 1 process, accumulative_counts=2, on the same mini-batches.

    BatchNorm normalises each rank's half with that half's statistics; the reference does the same because it
    forwards the same halves separately, so parameters and every loss term must agree (float32 summation
    order only: atol 1e-5). DDP runs without find_unused_parameters: every exit parameter is in every loss.
    """
    common = dict(data_root=data_root, model=MODELS[kind](), batch_size=2, checkpoint_interval=100)
    ddp_cfg = _write(tmp_path, "ddp", max_iters=3, **common)
    ref_cfg = _write(
        tmp_path,
        "ref",
        max_iters=6,
        accumulative_counts=2,
        sampler=dict(type="InterleavedSampler", world_size=2, batch_size=2),
        **common,
    )
    no_sched = "param_scheduler=None"
    torchrun(*TRAIN, str(ddp_cfg), "--launcher", "pytorch", "--cfg-options", no_sched)
    run_mm_inprocess(ref_cfg, "--cfg-options", no_sched, name=f"ref_{kind}")
    rank0, rank1, ref = probe(tmp_path / "ddp", 0), probe(tmp_path / "ddp", 1), probe(tmp_path / "ref")

    assert rank0["wrapper"] == "MMDistributedDataParallel" and ref["wrapper"] == type_name(kind)
    assert max_abs_diff(rank0["params"], rank1["params"]) == 0.0
    assert max_abs_diff(rank0["params"], ref["params"]) < 1e-5
    for key in rank0["records"][0]:
        if key.startswith("loss") or "_loss_" in key:
            ddp_losses = [r[key] for pair in zip(rank0["records"], rank1["records"]) for r in pair]
            assert ddp_losses == pytest.approx(losses_of(ref, key), rel=1e-5, abs=1e-6), key
    if kind == "selfdistill":
        assert {"exit1_loss_kd", "exit1_loss_hint", "exit3_loss_ce"} <= set(rank0["records"][0])


def type_name(kind: str) -> str:
    return "SelfDistillClassifier" if kind == "selfdistill" else "ImageClassifier"


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_amp_trains_in_reduced_precision_without_nan(tmp_path, data_root, kind):
    """``--amp``: bfloat16 autocast on CPU; on a GPU, MMPretrain's AmpOptimWrapper (float16, loss scaling)."""
    cfg = _write(tmp_path, "amp", data_root=data_root, model=MODELS[kind](), max_iters=4, checkpoint_interval=100)
    run_mm_inprocess(cfg, "--amp", name=f"amp_{kind}")
    info = probe(tmp_path / "amp")
    if torch.cuda.is_available():
        assert (info["optim_wrapper"], info["head_dtypes"]) == ("AmpOptimWrapper", ["torch.float16"])
    else:
        assert info["optim_wrapper"] == "CPUAutocastOptimWrapper"
        assert info["head_dtypes"] == ["torch.bfloat16"]  # the forward really ran under autocast
    values = [v for r in info["records"] for k, v in r.items() if "loss" in k]
    assert len(values) >= 4 and all(math.isfinite(v) for v in values)
    assert all(torch.isfinite(p).all() for p in info["params"].values())


def test_amp_float16_on_cpu_is_refused(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _write(tmp_path, "amp16", data_root=data_root, max_iters=1)
    with raises_documented("B21", ValueError, match="bfloat16"):
        run_mm_inprocess(cfg, "--amp", "--cfg-options", "optim_wrapper.dtype=float16", name="amp16")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, data_root, kind):
    """4 iterations in one go == a run that crashes after iteration 2 and is resumed (lr drops at iteration 3)."""
    from _rel_helpers import SimulatedCrash

    common = dict(data_root=data_root, model=MODELS[kind](), max_iters=4, checkpoint_interval=2)
    full = _write(tmp_path, "full", **common)
    crashing = write_config(mm_config(work_dir=tmp_path / "part", crash_after=2, **common), tmp_path / "crash.py")
    resumed = _write(tmp_path, "part", **common)
    run_mm_inprocess(full, name=f"full_{kind}")
    with pytest.raises(SimulatedCrash):
        run_mm_inprocess(crashing, name=f"crash_{kind}")
    assert (tmp_path / "part" / "iter_2.pth").is_file()
    run_mm_inprocess(resumed, "--resume", name=f"resumed_{kind}")
    a, b = probe(tmp_path / "full"), probe(tmp_path / "part")

    assert [r["iter"] for r in b["records"]] == [2, 3]  # it went on from iteration 2, not from 0
    assert [r["lr"] for r in b["records"]] == [r["lr"] for r in a["records"][2:]]
    assert losses_of(b) == pytest.approx(losses_of(a)[2:], rel=1e-6)
    assert max_abs_diff(a["params"], b["params"]) == 0.0
    momentum_a = [s["momentum_buffer"] for s in a["optim"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optim"]["state"].values()]
    assert len(momentum_a) == len(momentum_b) == len(a["params"])  # both sides, exits' optimizer state included
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))


@pytest.mark.slow
def test_ddp_resume_gives_the_weights_of_an_uninterrupted_ddp_run(tmp_path, data_root):
    """2 CPU ranks: a run that crashes after iteration 2 and is resumed == 4 iterations in one go."""
    common = dict(data_root=data_root, model=sd_resnet(), max_iters=4, checkpoint_interval=2)
    full = _write(tmp_path, "full", **common)
    crashing = write_config(mm_config(work_dir=tmp_path / "part", crash_after=2, **common), tmp_path / "crash.py")
    resumed = _write(tmp_path, "part", **common)
    torchrun(*TRAIN, str(full), "--launcher", "pytorch")
    crash = torchrun(*TRAIN, str(crashing), "--launcher", "pytorch", check=False)
    assert crash.returncode != 0 and "simulated crash after iteration 2" in crash.stderr + crash.stdout
    torchrun(*TRAIN, str(resumed), "--launcher", "pytorch", "--resume")
    for rank in (0, 1):
        a, b = probe(tmp_path / "full", rank), probe(tmp_path / "part", rank)
        assert [r["iter"] for r in b["records"]] == [2, 3]
        assert max_abs_diff(a["params"], b["params"]) == 0.0
    assert max_abs_diff(probe(tmp_path / "part", 0)["params"], probe(tmp_path / "part", 1)["params"]) == 0.0


@pytest.mark.slow
def test_plain_checkpoint_loads_into_selfdistill_model(tmp_path, data_root):
    """``load_from`` a plain ImageClassifier checkpoint: backbone and head come from it, exits start fresh."""
    plain = _write(tmp_path, "plain", data_root=data_root, model=tiny_resnet(), max_iters=2, checkpoint_interval=2)
    run_mm_inprocess(plain, name="plain_ckpt")
    ckpt = tmp_path / "plain" / "iter_2.pth"
    frozen = ["optim_wrapper.optimizer.lr=0.0", "optim_wrapper.optimizer.weight_decay=0.0"]
    fresh = _write(tmp_path, "fresh", data_root=data_root, model=sd_resnet(), max_iters=1)
    loaded = _write(tmp_path, "loaded", data_root=data_root, model=sd_resnet(), max_iters=1)
    run_mm_inprocess(fresh, "--cfg-options", *frozen, name="sd_fresh")
    run_mm_inprocess(loaded, "--cfg-options", f"load_from={ckpt}", *frozen, name="sd_loaded")

    old = probe(tmp_path / "plain")["params"]
    new, init = probe(tmp_path / "loaded")["params"], probe(tmp_path / "fresh")["params"]
    assert max_abs_diff(old, {k: new[k] for k in old}) == 0.0
    exit_keys = sorted(set(new) - set(old))
    assert exit_keys and all(k.startswith(("exit_necks.", "exit_heads.")) for k in exit_keys)
    assert max_abs_diff({k: new[k] for k in exit_keys}, {k: init[k] for k in exit_keys}) == 0.0
    log = next((tmp_path / "loaded").glob("*/*.log")).read_text()
    assert "exits start from their initialisation" in log and "exit_necks" in log


def test_ddp_launcher_without_torchrun_says_how_to_launch(tmp_path, data_root, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    if torch.cuda.is_available():
        pytest.skip("with CUDA mmengine's own launcher runs")
    cfg = _write(tmp_path, "nolaunch", data_root=data_root, max_iters=1)
    with raises_documented("B20", ValueError, match="torchrun --nproc_per_node"):
        run_mm_inprocess(cfg, "--launcher", "pytorch", name="nolaunch")


def test_num_workers_zero_gets_persistent_workers_off(tmp_path, data_root):
    """MMPretrain's script forces persistent_workers=True, which PyTorch refuses with num_workers=0."""
    from mmengine.config import Config

    tool = load_tool("train")
    cfg_dict = mm_config(data_root, tmp_path / "nw")
    del cfg_dict["train_dataloader"]["persistent_workers"]
    cfg_path = write_config(cfg_dict, tmp_path / "nw.py")
    for options, expected in (([], False), (["train_dataloader.num_workers=2"], True)):
        args = tool.parse_args([str(cfg_path), "--cfg-options", *options] if options else [str(cfg_path)])
        cfg = tool.merge_args(Config.fromfile(str(cfg_path)), args)
        assert cfg.train_dataloader.persistent_workers is expected, options
