"""``sd-plugin train`` and ``sd_plugin._dist``: on GPUs the config is MMPretrain's; on CPU the fixes kick in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _rel_helpers import mm_config, raises_documented, write_config
from _rel_run import load_tool

from sd_plugin import _dist

pytestmark = pytest.mark.mmpretrain


@pytest.fixture()
def cfg_path(tmp_path: Path) -> Path:
    return write_config(mm_config(tmp_path / "data", tmp_path / "wd"), tmp_path / "c.py")


def _merged(cfg_path: Path, *argv: str):
    from mmengine.config import Config

    tool = load_tool("train")
    return tool.merge_args(Config.fromfile(str(cfg_path)), tool.parse_args([str(cfg_path), *argv]))


def test_amp_with_cuda_is_mmpretrains_amp_optim_wrapper(cfg_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _merged(cfg_path, "--amp")
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.loss_scale == "dynamic"


def test_amp_without_cuda_is_bfloat16_autocast(cfg_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _merged(cfg_path, "--amp")
    assert cfg.optim_wrapper.type == "CPUAutocastOptimWrapper" and cfg.optim_wrapper.dtype == "bfloat16"
    assert "loss_scale" not in cfg.optim_wrapper


def test_cli_matches_mmpretrains_script(cfg_path):
    cfg = _merged(
        cfg_path, "--work-dir", "/tmp/x", "--no-validate", "--resume", "--cfg-options", "train_cfg.max_iters=9"
    )
    assert cfg.work_dir == "/tmp/x" and cfg.val_dataloader is None and cfg.val_cfg is None
    assert cfg.resume is True and cfg.load_from is None and cfg.train_cfg.max_iters == 9
    assert cfg.launcher == "none" and cfg.train_dataloader.collate_fn == dict(type="default_collate")


def test_cuda_ddp_is_left_to_mmengine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = {"launcher": "pytorch"}
    assert _dist.prepare_mmengine_cpu_ddp(cfg) is False and "model_wrapper_cfg" not in cfg


def test_cpu_ddp_sets_gloo_and_a_wrapper_without_device_ids(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(_dist, "init_process_group_from_env", lambda backend, timeout: calls.append(backend))
    cfg = {"launcher": "pytorch"}
    assert _dist.prepare_mmengine_cpu_ddp(cfg) is True and calls == ["gloo"]
    assert cfg["model_wrapper_cfg"] == dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    own = {"launcher": "pytorch", "model_wrapper_cfg": dict(type="MMDistributedDataParallel", device_ids=[0])}
    _dist.prepare_mmengine_cpu_ddp(own)
    assert own["model_wrapper_cfg"]["device_ids"] is None  # a user's wrapper keeps its type, loses the GPU ids
    assert _dist.prepare_mmengine_cpu_ddp({"launcher": "none"}) is False


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, r"\['MASTER_PORT'\] are not set"),
        ({"RANK": "a", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "integers"),
        ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "outside"),
    ],
)
def test_bad_torchrun_environment(monkeypatch, env, words):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=words):
        _dist.read_dist_env()


def test_auto_scale_lr_without_its_config_section(cfg_path):
    with pytest.raises(ValueError, match=r"--auto-scale-lr needs `auto_scale_lr=dict\(base_batch_size=...\)`"):
        _merged(cfg_path, "--auto-scale-lr")


def test_amp_optim_wrapper_in_the_config_on_cpu(cfg_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with raises_documented("B29", ValueError, match=r"'AmpOptimWrapper' needs a GPU.*CPUAutocastOptimWrapper"):
        _merged(cfg_path, "--cfg-options", "optim_wrapper.type=AmpOptimWrapper")
