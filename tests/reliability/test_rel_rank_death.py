"""A rank that dies (SIGKILL) or hangs in a 2-rank CPU ``torchrun`` ends the job; ``--resume`` then loses nothing.

Both tools, each rank with 2 data-loader workers. The doomed rank stalls at a known step of epoch 2
(``_rel_rank_death``) while the other trains on into that step's gradient all-reduce; the test then:

- SIGKILLs it: torchrun exits with 1 within ``DEATH_EXIT_LIMIT_S`` (measured: about 1 s without data-loader
  workers, about 5 s with them: the dead rank's orphaned workers hold its gloo connections open until their
  parent check, every 5 s), no rank or worker process is left, and ``--resume`` from the last checkpoint (the
  one of epoch 1) reaches the uninterrupted run's weights bitwise;
- leaves it hanging: the collective timeout the user sets (``--dist-timeout`` / ``env_cfg.dist_cfg.timeout``)
  ends the job with exit code 1 soon after it expires, instead of torch's default 30 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest
import torch
from _rel_helpers import REPO, augmented_epoch_config, make_image_folder, sd_resnet, subprocess_env, write_config
from _rel_run import TORCHRUN, TRAIN, TRAIN_TIMM, free_port, max_abs_diff, probe, torchrun

WORLD = 2
EPOCHS = 2
STEPS_PER_EPOCH = 2  # 16 images, batch 4 per rank, 2 ranks
DEATH_EXIT_LIMIT_S = 20.0  # a hung job would wait for the collective timeout (torch's default: 30 min)
HANG_TIMEOUT_S = 5  # the collective timeout set in the hang tests
HANG_EXIT_LIMIT_S = HANG_TIMEOUT_S + 25.0
MARKER_WAIT_S = 240


def _tree(pid: int) -> List[int]:
    """The process ids below ``pid`` (ranks and their data-loader workers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return kids + [d for k in kids for d in _tree(k)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _launch_until_stalled(cmd: Sequence[str], marker: Path, log: Path) -> Tuple[subprocess.Popen, int, List[int]]:
    """Start ``cmd``; return it, the stalled rank's pid and every process under torchrun once the rank stalls."""
    with log.open("w") as out:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + MARKER_WAIT_S
    while not marker.is_file():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no rank stalled (exit code {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    return proc, int(marker.read_text()), _tree(proc.pid)


def _wait(proc: subprocess.Popen, limit: float, log: Path) -> float:
    start = time.time()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        for pid in reversed(_tree(proc.pid)):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        raise AssertionError(f"the job still ran {limit:.0f} s later:\n{log.read_text()[-4000:]}") from None
    return time.time() - start


def _kill_stalled_rank(cmd: Sequence[str], marker: Path, log: Path) -> None:
    proc, pid, procs = _launch_until_stalled(cmd, marker, log)
    assert len(procs) >= WORLD * 3, procs  # the ranks and their data-loader workers
    os.kill(pid, signal.SIGKILL)
    seconds = _wait(proc, DEATH_EXIT_LIMIT_S, log)
    assert proc.returncode == 1, log.read_text()[-4000:]
    time.sleep(0.5)
    assert [p for p in procs if _alive(p)] == [], "processes left after the job ended"
    print(f"job ended {seconds:.2f} s after the SIGKILL")


def _torchrun_cmd(*args: str) -> List[str]:
    return [TORCHRUN, f"--nproc_per_node={WORLD}", f"--master_port={free_port()}", *args]


# ------------------------------------------------------------------------------------------ MMPretrain route
def _mm_config(data: Path, work_dir: Path, **stall: Any) -> Dict[str, Any]:
    cfg = augmented_epoch_config(data, work_dir, model=sd_resnet(), max_epochs=EPOCHS, num_workers=2)
    if stall:
        cfg["custom_imports"]["imports"].append("_rel_rank_death")
        cfg["custom_hooks"].append(dict(type="StallRankHook", **stall))
    return cfg


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_mm_sigkill_of_a_rank_ends_the_job_and_resume_is_exact(tmp_path):
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8)
    full = write_config(_mm_config(data, tmp_path / "full"), tmp_path / "full.py")
    torchrun(*TRAIN, str(full), "--launcher", "pytorch", nproc=WORLD)

    marker = tmp_path / "stalled"
    stall = dict(rank=1, at_iter=STEPS_PER_EPOCH + 1, marker=str(marker))  # the 2nd step of epoch 2
    killed = write_config(_mm_config(data, tmp_path / "part", **stall), tmp_path / "killed.py")
    cmd = _torchrun_cmd(*TRAIN, str(killed), "--launcher", "pytorch")
    _kill_stalled_rank(cmd, marker, tmp_path / "killed.log")
    part = tmp_path / "part"
    assert (part / "epoch_1.pth").is_file() and not (part / "epoch_2.pth").exists()

    resume = write_config(_mm_config(data, part), tmp_path / "resume.py")
    torchrun(*TRAIN, str(resume), "--launcher", "pytorch", "--resume", nproc=WORLD)
    a, b = probe(tmp_path / "full"), probe(part)
    assert [r["iter"] for r in b["records"]] == [2, 3]  # epoch 2 again, from the checkpoint of epoch 1
    assert [r["loss"] for r in b["records"]] == [r["loss"] for r in a["records"][STEPS_PER_EPOCH:]]
    assert max_abs_diff(a["params"], b["params"]) == 0.0


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_mm_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8)
    marker = tmp_path / "stalled"
    cfg = _mm_config(data, tmp_path / "wd", rank=1, at_iter=STEPS_PER_EPOCH + 1, marker=str(marker))
    cfg["env_cfg"]["dist_cfg"] = dict(timeout=HANG_TIMEOUT_S)
    cmd = _torchrun_cmd(*TRAIN, str(write_config(cfg, tmp_path / "c.py")), "--launcher", "pytorch")
    log = tmp_path / "hung.log"
    proc, _, _ = _launch_until_stalled(cmd, marker, log)
    _wait(proc, HANG_EXIT_LIMIT_S, log)
    assert proc.returncode == 1, log.read_text()[-4000:]


# ------------------------------------------------------------------------------------------------ timm route
TIMM = ["--model", "test_resnet", "--img-size", "32", "-b", "4", "--workers", "2", "--no-progress"]
TIMM += ["--epochs", str(EPOCHS)]


def _timm_data(root: Path) -> Path:
    make_image_folder(root / "train", num_classes=2, per_class=8)
    make_image_folder(root / "val", num_classes=2, per_class=2, seed=1)
    return root


def _stalling_timm(marker: Path, rank: int, data: Path, out: Path, *extra: str) -> List[str]:
    script = str(Path(__file__).with_name("_rel_rank_death.py"))
    stall = [str(marker), str(rank), str(EPOCHS), "2"]  # before the 2nd step of epoch 2
    return _torchrun_cmd(script, *stall, "--", str(data), *TIMM, "--output", str(out), *extra)


@pytest.mark.slow
@pytest.mark.timm
def test_timm_sigkill_of_a_rank_ends_the_job_and_resume_is_exact(tmp_path):
    data = _timm_data(tmp_path / "data")
    torchrun(*TRAIN_TIMM, str(data), *TIMM, "--output", str(tmp_path / "full"), nproc=WORLD)

    marker = tmp_path / "stalled"
    part = tmp_path / "part"
    _kill_stalled_rank(_stalling_timm(marker, 0, data, part), marker, tmp_path / "killed.log")  # rank 0 dies
    ckpt = torch.load(part / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1

    resume = ["--resume", str(part / "checkpoint-last.pth")]
    torchrun(*TRAIN_TIMM, str(data), *TIMM, "--output", str(part), *resume, nproc=WORLD)
    load = lambda d: torch.load(d / "checkpoint-last.pth", map_location="cpu", weights_only=False)  # noqa: E731
    full, resumed = load(tmp_path / "full"), load(part)
    assert resumed["epoch"] == full["epoch"] == EPOCHS
    summary = lambda d: json.loads((d / "summary.json").read_text())["epochs"]  # noqa: E731
    assert [h["loss"] for h in summary(part)] == [h["loss"] for h in summary(tmp_path / "full")]
    assert max_abs_diff(full["state_dict"], resumed["state_dict"]) == 0.0
    momenta = [
        (s["momentum_buffer"], resumed["optimizer"]["state"][k]["momentum_buffer"])
        for k, s in full["optimizer"]["state"].items()
    ]
    assert momenta and all(torch.equal(x, y) for x, y in momenta)


@pytest.mark.slow
@pytest.mark.timm
def test_timm_hung_rank_ends_the_job_after_dist_timeout(tmp_path):
    data = _timm_data(tmp_path / "data")
    marker = tmp_path / "stalled"
    cmd = _stalling_timm(marker, 1, data, tmp_path / "out", "--dist-timeout", str(HANG_TIMEOUT_S))
    log = tmp_path / "hung.log"
    proc, _, _ = _launch_until_stalled(cmd, marker, log)
    _wait(proc, HANG_EXIT_LIMIT_S, log)
    assert proc.returncode == 1, log.read_text()[-4000:]
