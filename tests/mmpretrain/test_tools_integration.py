"""End to end with MMPretrain's own tools: train.py, train.py --resume, test.py on the one- and two-line configs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mmpretrain, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo_data" / "cifar10_mini"
CLASSES = ("airplane", "cat")

TWO_LINES = """
_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']
custom_imports = dict(imports=['sd_plugin'], allow_failed_imports=False)
model = dict(type='SelfDistillClassifier', head=dict(num_classes=2))
"""
ONE_LINE = """
_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']
model = dict(type='sd_plugin.SelfDistillClassifier', head=dict(num_classes=2))
"""
DATA = """

# A tiny ImageFolder data set instead of the base config's CIFAR-10 download.
data_root = '{root}'
data_preprocessor = dict(num_classes=2, to_rgb=True)
_loader = dict(batch_size=4, num_workers=0, persistent_workers=False)
train_dataloader = dict(**_loader, dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
    data_prefix='train', pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')]))
val_dataloader = dict(**_loader, dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
    data_prefix='test', pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')]))
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type='{scope}MultiExitAccuracy')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
custom_hooks = [dict(type='{scope}DistillWeightWarmupHook', warmup_iters=2)]
"""
CONFIG = TWO_LINES + DATA.replace("{scope}", "")


def _tool(name: str) -> str:
    import mmpretrain

    return os.path.join(os.path.dirname(mmpretrain.__file__), ".mim", "tools", name)


def _run(args: list, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_FORCE")}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _tiny_imagefolder(root: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for cls in CLASSES:
            src = sorted((DEMO / split / cls).glob("*.jpg"))[:n]
            assert len(src) == n, f"demo data missing under {DEMO / split / cls}"
            (root / split / cls).mkdir(parents=True)
            for f in src:
                shutil.copy(f, root / split / cls / f.name)


def test_train_resume_test_with_mmpretrain_tools(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tiny_imagefolder(data)
    cfg = tmp_path / "sd_tiny.py"
    cfg.write_text(CONFIG.format(root=data))
    work = tmp_path / "work"

    out = _run([_tool("train.py"), str(cfg), "--work-dir", str(work)], tmp_path)
    assert (work / "epoch_1.pth").is_file()
    for key in ("loss_ce", "exit1_loss_ce", "exit3_loss_kd", "exit3_loss_hint"):
        assert key in out, f"{key} not logged"
    assert re.search(r"multi-exit/exit1_top1: [\d.]+", out)

    out = _run(
        [_tool("train.py"), str(cfg), "--work-dir", str(work), "--resume", "--cfg-options", "train_cfg.max_epochs=2"],
        tmp_path,
    )
    assert re.search(r"(?i)resumed? (from )?(the )?checkpoint|load checkpoint from", out), out[-2000:]
    assert "Epoch(train) [2]" in out
    assert (work / "epoch_2.pth").is_file()

    out = _run([_tool("test.py"), str(cfg), str(work / "epoch_2.pth"), "--work-dir", str(work / "test")], tmp_path)
    for key in ("exit1_top1", "exit3_top1", "deepest_top1", "ensemble_top1"):
        assert re.search(rf"multi-exit/{key}: [\d.]+", out), f"{key} missing from test.py output"


def test_one_line_config_with_mmpretrain_tools(tmp_path: Path) -> None:
    """``type='sd_plugin.SelfDistillClassifier'`` with no custom_imports: scoped model, metric and hook resolve."""
    data = tmp_path / "data"
    _tiny_imagefolder(data)
    cfg = tmp_path / "sd_one_line.py"
    text = ONE_LINE + DATA.replace("{scope}", "sd_plugin.").format(root=data)
    assert "custom_imports" not in text and "import" not in text.replace("_base_", "")
    cfg.write_text(text)
    work = tmp_path / "work"

    out = _run([_tool("train.py"), str(cfg), "--work-dir", str(work)], tmp_path)
    for key in ("loss_ce", "exit1_loss_ce", "exit3_loss_kd"):
        assert key in out, f"{key} not logged"
    assert re.search(r"multi-exit/exit1_top1: [\d.]+", out)
    assert "DistillWeightWarmupHook" in out  # listed among the runner's hooks

    out = _run([_tool("test.py"), str(cfg), str(work / "epoch_1.pth"), "--work-dir", str(work / "test")], tmp_path)
    for key in ("exit1_top1", "deepest_top1", "ensemble_top1"):
        assert re.search(rf"multi-exit/{key}: [\d.]+", out), f"{key} missing from test.py output"


DDP_SCRIPT = """
import os, sys
import torch.distributed as dist
import sd_plugin  # noqa: F401
from mmengine.config import Config
from mmengine.runner import Runner

dist.init_process_group('gloo', rank=0, world_size=1)
cfg = Config.fromfile(sys.argv[1])
cfg.work_dir = sys.argv[2]
cfg.launcher = 'pytorch'
cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
runner = Runner.from_cfg(cfg)
runner.train()
model = runner.model
assert type(model).__name__ == 'MMDistributedDataParallel', type(model)
# warmup_iters=2 over 2 iterations: the hook reached the wrapped model (scale 0, then 0.5)
assert model.module.distill_loss.distill_scale == 0.5, model.module.distill_loss.distill_scale
print('DDP-OK')
"""


def test_ddp_wrapper_on_cpu(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tiny_imagefolder(data)
    cfg = tmp_path / "sd_tiny.py"
    cfg.write_text(CONFIG.format(root=data))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env_extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env_extra}
    os.environ.update(env_extra)
    try:
        out = _run([str(script), str(cfg), str(tmp_path / "work")], tmp_path)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert "DDP-OK" in out
    assert "exit1_loss_kd" in out
