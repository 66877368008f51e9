"""``sd-plugin train`` ends cleanly: exit code 0 after a finished 2-rank run, every time; SIGTERM stops it cleanly.

Cause of the old failure: the gloo process group was never destroyed, so the interpreter tore it down during
its own finalisation while gloo's C++ worker threads still held work objects; on some runs rank 0 then died in
``std::terminate`` ("terminate called without an active exception", exit code -6) after training and
validation had finished, and torchrun reported the job failed. ``sd_plugin.cli.train.clean_shutdown`` stops the
data-loader workers, waits for every rank (barrier) and destroys the group before the interpreter exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _rel_helpers import REPO, augmented_epoch_config, make_image_folder, sd_resnet, subprocess_env, write_config
from _rel_run import PYTHON, TRAIN, torchrun

pytestmark = pytest.mark.mmpretrain

RUNS = 10


@pytest.mark.slow
def test_two_rank_cpu_run_exits_0_ten_times_in_a_row(tmp_path):
    """One epoch (2 steps per rank) with 2 persistent workers per rank and validation, ten times."""
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8)
    failures = []
    for i in range(RUNS):
        cfg = augmented_epoch_config(data, tmp_path / f"wd{i}", model=sd_resnet(), max_epochs=1, num_workers=2)
        proc = torchrun(*TRAIN, str(write_config(cfg, tmp_path / f"c{i}.py")), "--launcher", "pytorch", check=False)
        if proc.returncode != 0 or "terminate called" in proc.stderr:
            failures.append((i, proc.returncode, proc.stderr[-2000:]))
        assert (tmp_path / f"wd{i}" / "epoch_1.pth").is_file()
    assert failures == []


def _children(pid: int) -> list:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_sigterm_stops_training_and_its_workers(tmp_path):
    """SIGTERM (what schedulers and torchrun send) mid-training: exit code 143, no data-loader worker left behind."""
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8)
    cfg = augmented_epoch_config(data, tmp_path / "wd", model=sd_resnet(), max_epochs=1000, num_workers=2)
    proc = subprocess.Popen(
        [PYTHON, *TRAIN, str(write_config(cfg, tmp_path / "c.py"))],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not (tmp_path / "wd" / "epoch_1.pth").is_file():  # training is under way, workers are running
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert workers, "expected data-loader worker processes"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "terminate called" not in err
    time.sleep(1)
    assert [w for w in workers if os.path.exists(f"/proc/{w}") and _state(w) != "Z"] == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return "gone"
