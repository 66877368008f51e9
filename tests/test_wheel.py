"""The built wheel: the package, its type marker, the configs and the ``sd-plugin`` console script; installed into a
fresh venv that holds only what ``sd-plugin[timm]`` needs, it imports, and the command line trains a timm model
(``sd-plugin train-timm``) and runs on its checkpoint."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "demo_data" / "cifar10_mini"
#: What ``sd-plugin[timm]`` depends on (pyproject.toml: the dependencies and the timm extra).
TIMM_INSTALL = ("torch", "numpy", "timm", "torchvision")
#: Frameworks a timm-only install must not see (the honest check: the command line cannot lean on them).
MM_FRAMEWORKS = ("mmpretrain", "mmcv", "mmengine")
SUBCOMMANDS = ("train", "train-timm", "report", "calibrate", "strip", "export")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names):
    """The installed distributions ``names`` need, transitively, with the extras each requirement asks for
    (environment markers evaluated)."""
    from packaging.requirements import Requirement

    found, done = {}, set()
    todo = [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        key = (_canonical(name), extra)
        if key in done:
            continue
        done.add(key)
        try:
            dist = found.get(key[0]) or metadata.distribution(key[0])
        except metadata.PackageNotFoundError:
            continue  # pip says so below if it is really needed
        found[key[0]] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in ("", *req.extras)]
    return found


def _timm_only_site(dest: Path) -> Path:
    """A folder of links to this venv's site-packages entries of the timm install's distributions, and no others."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    dists = _closure(TIMM_INSTALL)
    assert not set(dists) & {_canonical(m) for m in MM_FRAMEWORKS}
    for dist in dists.values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if top != "__pycache__" and not top.endswith(".pth") and not (dest / top).exists():
                (dest / top).symlink_to(site / top)
    return dest


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    # Build from a copy, so a stale build/ folder in the checkout cannot leak into the wheel.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "demo_data", "work_dirs", "site"
    )
    shutil.copytree(ROOT, src, symlinks=True, ignore=skip)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("sd_plugin-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "sd_plugin/py.typed" in names
    assert "sd_plugin/core/losses.py" in names
    assert {"sd_plugin/__main__.py", "sd_plugin/cli/__init__.py", "sd_plugin/cli/report.py"} <= set(names)
    configs = sorted(n for n in names if n.startswith("sd_plugin/.mim/configs/") and n.endswith(".py"))
    repo_configs = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.py"))
    assert [c.removeprefix("sd_plugin/.mim/configs/") for c in configs] == repo_configs
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "sd-plugin = sd_plugin.cli:main" in archive.read(entry_points).decode()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, script = venv / "bin" / "python", venv / "bin" / "sd-plugin"
    # The timm install's distributions (torch, timm, torchvision, numpy and what they need) come from this venv's
    # site-packages, read-only, through links; nothing else of it is visible (no MMPretrain, mmcv, mmengine, onnx,
    # matplotlib). pip resolves `sd-plugin[timm]` against them without an index: nothing is downloaded.
    deps = _timm_only_site(tmp_path / "timm_site")
    (next((venv / "lib").glob("python3*")) / "site-packages" / "deps.pth").write_text(f"{deps}\n")
    # The venv's own setuptools (bundled before Python 3.12) would shadow the newer one torch requires.
    _run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"])
    no_config = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # no find-links: the index is off, entirely
    install = _run([py, "-m", "pip", "install", "-q", "--no-index", f"{wheel}[timm]"], env=no_config)
    assert install.returncode == 0, install.stdout + install.stderr
    venv_site = next((venv / "lib").glob("python3*")) / "site-packages"
    assert {p.name.split("-")[0] for p in venv_site.glob("*.dist-info")} == {"pip", "sd_plugin"}  # nothing else
    code = (
        "import importlib.util, os, sd_plugin, sd_plugin.core;"
        "p = os.path.dirname(sd_plugin.__file__);"
        f"assert p.startswith({str(venv)!r}), p;"
        "assert os.path.isfile(os.path.join(p, 'py.typed'));"
        f"assert not [m for m in {MM_FRAMEWORKS!r} if importlib.util.find_spec(m)];"
        "print(sd_plugin.__version__, len(os.listdir(os.path.join(p, '.mim', 'configs'))))"
    )
    run = _run([py, "-c", code], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout.split()
    from sd_plugin import __version__

    assert out[0] == __version__
    assert int(out[1]) >= 1

    # The console script and `python -m sd_plugin`: help of every command.
    for command in [[], *([c] for c in SUBCOMMANDS)]:
        run = _run([script, *command, "--help"], cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(" ".join(["usage: sd-plugin", *command])) and "examples:" in run.stdout
    run = _run([py, "-m", "sd_plugin", "--version"], cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == f"sd-plugin {__version__}", run.stderr

    # A real checkpoint of `sd-plugin train-timm` (one tiny epoch) and the report on it, both in the timm-only install.
    train = tmp_path / "train"
    cmd = [
        script, "train-timm", DATA, "--model", "test_resnet", "--img-size", "32",
        "--epochs", "1", "-b", "32", "--max-train-samples", "64", "--max-val-samples", "32", "--workers", "0",
        "--no-progress", "--output", train,
    ]  # fmt: skip
    trained = _run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = train / "checkpoint-last.pth"
    report = _run(
        [script, "report", ckpt, "--data", DATA, "--max-samples", "16", "--batch-size", "8", "--out-dir", tmp_path,
         "--name", "r"],
        cwd=tmp_path,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["exit"] for r in result["exits"]] == ["exit1", "exit2", "exit3", "deepest", "ensemble"]
    assert result["model"] == "test_resnet" and result["num_samples"] == 16
    assert result["flops_counted"] is False and "pip install mmengine" in report.stdout  # says how to get FLOPs
    assert "no plot: matplotlib is not installed" in report.stdout
    strip = _run([script, "strip", ckpt, tmp_path / "plain.pth"], cwd=tmp_path)
    assert strip.returncode == 0 and "loads strictly into timm test_resnet" in strip.stdout, strip.stderr[-3000:]
