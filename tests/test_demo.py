"""The front-door demo runs end to end and prints the per-exit table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_demo_prints_per_exit_table(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--epochs", "1", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout[run.stdout.index("| classifier |") :].splitlines()
    names = [row.split("|")[1].strip() for row in table[2:] if row.startswith("|")]
    assert names == ["exit1", "exit2", "exit3", "deepest", "ensemble"]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    # A model ending at a shallower exit is smaller and cheaper than the whole model.
    assert summary["flops"] == sorted(summary["flops"])
    assert all(p < summary["params"][-1] for p in summary["params"][:-1])
    assert all(0.0 <= v <= 100.0 for v in summary["metrics"].values())
