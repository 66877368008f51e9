"""The built wheel holds the package, its type marker and the configs, and imports in a fresh venv."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    # Build from a copy, so a stale build/ folder in the checkout cannot leak into the wheel.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "demo_data", "work_dirs"
    )
    shutil.copytree(ROOT, src, symlinks=True, ignore=skip)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("sd_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sd_plugin/py.typed" in names
    assert "sd_plugin/core/losses.py" in names
    configs = sorted(n for n in names if n.startswith("sd_plugin/.mim/configs/") and n.endswith(".py"))
    repo_configs = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.py"))
    assert [c.removeprefix("sd_plugin/.mim/configs/") for c in configs] == repo_configs
    assert not any(n.startswith(("tests/", "tools/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The heavy dependencies (torch, mmpretrain, timm) come from this venv's site-packages, read-only;
    # sd_plugin itself must come from the installed wheel.
    site = Path(sysconfig.get_paths()["purelib"])
    (next((venv / "lib").glob("python3*")) / "site-packages" / "deps.pth").write_text(f"{site}\n")
    code = (
        "import os, sd_plugin, sd_plugin.core;"
        "p = os.path.dirname(sd_plugin.__file__);"
        f"assert p.startswith({str(venv)!r}), p;"
        "assert os.path.isfile(os.path.join(p, 'py.typed'));"
        "print(sd_plugin.__version__, len(os.listdir(os.path.join(p, '.mim', 'configs'))))"
    )
    run = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout.split()
    from sd_plugin import __version__

    assert out[0] == __version__
    assert int(out[1]) >= 1
