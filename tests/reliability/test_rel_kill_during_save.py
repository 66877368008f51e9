"""A training process SIGKILLed while it writes a checkpoint loses nothing; a damaged latest checkpoint is named.

The kill is real: the training subprocess stalls half-way through writing the checkpoint (the kernel refused
the rest of the write, see ``_rel_helpers.stall_on_next_big_write``), and the test sends it SIGKILL there. Then
``--resume`` goes on from the previous checkpoint and reaches the uninterrupted run's weights bitwise.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from _rel_helpers import (
    REPO,
    make_image_folder,
    mm_config,
    raises_documented,
    sd_resnet,
    subprocess_env,
    write_config,
)
from _rel_run import PYTHON, TRAIN, TRAIN_TIMM, load_tool, max_abs_diff, probe, run_cmd, run_mm_inprocess

from sd_plugin._io import atomic_save, check_checkpoint_file
from sd_plugin._safe_globals import load_checkpoint_file


def _kill_when_stalled(cmd: List[str], marker: Path, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not marker.exists():
            if proc.poll() is not None or time.time() > deadline:
                out = proc.stdout.read().decode()[-4000:] if proc.stdout else ""
                raise AssertionError(f"the run never reached the stalled save (rc {proc.poll()}):\n{out}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def _all_checkpoints_complete(folder: Path) -> List[str]:
    names = sorted(p.name for p in folder.glob("*.pth"))
    for name in names:
        check_checkpoint_file(folder / name)
    return names


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_sigkill_while_saving_keeps_the_last_checkpoint_and_resume_loses_nothing_mm(tmp_path):
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8)
    common = dict(data_root=data, model=sd_resnet(), max_iters=4, checkpoint_interval=2)
    run_mm_inprocess(
        write_config(mm_config(work_dir=tmp_path / "full", **common), tmp_path / "full.py"), name="kill_full"
    )

    marker = tmp_path / "stalled"
    killed = mm_config(work_dir=tmp_path / "part", **common)
    killed["custom_hooks"].append(dict(type="StallDuringSaveHook", at_iter=4, marker=str(marker)))
    _kill_when_stalled([PYTHON, *TRAIN, str(write_config(killed, tmp_path / "killed.py"))], marker)

    part = tmp_path / "part"
    assert _all_checkpoints_complete(part) == ["iter_2.pth"]  # no cut-short iter_4.pth
    assert list(part.glob(".iter_4.pth.*.tmp")), "the kill came while iter_4.pth was being written"
    assert (part / "last_checkpoint").read_text().strip() == str(part / "iter_2.pth")
    load_checkpoint_file(part / "iter_2.pth")

    resumed = write_config(mm_config(work_dir=part, **common), tmp_path / "resumed.py")
    run_cmd([PYTHON, *TRAIN, str(resumed), "--resume"])
    a, b = probe(tmp_path / "full"), probe(part)
    assert [r["iter"] for r in b["records"]] == [2, 3]
    assert max_abs_diff(a["params"], b["params"]) == 0.0


@pytest.mark.slow
@pytest.mark.timm
def test_sigkill_while_saving_keeps_the_last_checkpoint_and_resume_loses_nothing_timm(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data / "train", num_classes=2, per_class=8)
    make_image_folder(data / "val", num_classes=2, per_class=2, seed=1)
    args = ["--model", "test_resnet", "--img-size", "32", "-b", "4", "--workers", "0", "--no-progress", "--epochs", "2"]
    here = Path(__file__).resolve().parent
    run_cmd([PYTHON, *TRAIN_TIMM, str(data), *args, "--output", str(tmp_path / "full")])

    marker, part = tmp_path / "stalled", tmp_path / "part"
    cmd = [PYTHON, str(here / "_rel_kill_timm.py"), str(marker), "2", "--", str(data), *args, "--output", str(part)]
    _kill_when_stalled(cmd, marker)

    assert _all_checkpoints_complete(part) == ["checkpoint-last.pth", "exits.pth", "model_plain.pth"]
    assert torch.load(part / "checkpoint-last.pth", weights_only=True)["epoch"] == 1  # the previous one, intact
    assert list(part.glob(".checkpoint-last.pth.*.tmp")), "the kill came while checkpoint-last.pth was written"
    run_cmd(
        [
            PYTHON,
            *TRAIN_TIMM,
            str(data),
            *args,
            "--output",
            str(part),
            "--resume",
            str(part / "checkpoint-last.pth"),
        ]
    )
    full = torch.load(tmp_path / "full" / "checkpoint-last.pth", weights_only=True)
    resumed = torch.load(part / "checkpoint-last.pth", weights_only=True)
    assert resumed["epoch"] == 2 and max_abs_diff(full["state_dict"], resumed["state_dict"]) == 0.0


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # corrupt: the zip directory is intact, a stored tensor record is not (torch would load it silently)
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)
        path.write_bytes(bytes(data))


@pytest.mark.mmpretrain
@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_latest_checkpoint_names_the_file_and_the_last_good_one_mm(tmp_path, how):
    """``--resume`` (latest of the work dir) and ``--resume FILE``: the message names both files."""
    work = tmp_path / "wd"
    work.mkdir()
    state = {"meta": {}, "state_dict": {"w": torch.arange(50000.0)}}
    atomic_save(state, work / "iter_2.pth")
    time.sleep(0.01)
    atomic_save(state, work / "iter_4.pth")
    (work / "last_checkpoint").write_text(str(work / "iter_4.pth"))
    _damage(work / "iter_4.pth", how)
    cfg = write_config(mm_config(tmp_path / "data", work), tmp_path / "c.py")
    expected = r"iter_4.pth'.*(truncated|damaged).*newest intact checkpoint next to it is '.*iter_2.pth'"
    for resume in (["--resume"], ["--resume", str(work / "iter_4.pth")]):
        with raises_documented("B24" if how == "truncated" else "B30", ValueError, match=expected):
            run_mm_inprocess(cfg, *resume, name=f"damaged_{how}_{len(resume)}")


@pytest.mark.timm
@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_checkpoint_is_named_timm(tmp_path, how):
    atomic_save({"state_dict": {"w": torch.arange(50000.0)}, "epoch": 1}, tmp_path / "checkpoint-last.pth")
    _damage(tmp_path / "checkpoint-last.pth", how)
    tool = load_tool("train_timm")
    (tmp_path / "model_plain.pth").write_bytes((tmp_path / "checkpoint-last.pth").read_bytes()[:0])  # not a resume file
    atomic_save({"w": torch.zeros(3)}, tmp_path / "exits.pth")  # intact, but not a checkpoint to resume from
    with pytest.raises(ValueError, match=r"--resume '.*checkpoint-last.pth'.*(truncated|damaged).*no other intact"):
        tool.load_resume_checkpoint(str(tmp_path / "checkpoint-last.pth"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
