"""FSDP (mmengine ``FlexibleRunner``) saves sharded checkpoints of a self-distilled ViT and resumes them exactly.

mmengine 0.10.7's ``FSDPStrategy`` cannot resume on torch 2.14 (``optim_state_dict_to_load`` gets its arguments
in torch 2.0's order: ``TypeError: unhashable type: 'dict'``); ``ResumableFSDPStrategy``
(``sd_plugin.mmpretrain_adapter.fsdp_strategy``) makes that one call with keyword arguments. On 2 CPU ranks (gloo,
``device_id='cpu'``) through ``sd-plugin train``: 2 epochs straight == 1 epoch, a crash, ``--resume``, 1 epoch,
bitwise (each rank's parameter shards, momentum shards, per-iteration losses and learning rates).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from _rel_helpers import make_image_folder, mm_config, write_config
from _rel_run import TRAIN, load_tool, torchrun
from mmengine._strategy import FSDPStrategy
from mmengine.registry import STRATEGIES

from sd_plugin.mmpretrain_adapter.fsdp_strategy import RESUMABLE_FSDP_STRATEGY, ResumableFSDPStrategy

pytestmark = pytest.mark.mmpretrain

WORLD = 2
EPOCHS = 2
STRATEGY_MODULE = "sd_plugin.mmpretrain_adapter.fsdp_strategy"


def test_strategy_is_registered_and_changes_only_the_optimizer_load():
    assert STRATEGIES.get(RESUMABLE_FSDP_STRATEGY) is ResumableFSDPStrategy
    assert issubclass(ResumableFSDPStrategy, FSDPStrategy)
    methods = {name for name, value in vars(ResumableFSDPStrategy).items() if callable(value)}
    assert methods == {"load_optim_state_dict"}  # mmengine's behaviour everywhere else


def test_resume_checks_every_shard_of_a_sharded_checkpoint(tmp_path):
    check = load_tool("train")._check_checkpoint
    folder = tmp_path / "epoch_1.pth"
    folder.mkdir()
    with pytest.raises(ValueError, match="folder without rank"):
        check(str(folder), "--resume")
    for rank in range(WORLD):
        torch.save({"state_dict": {"w": torch.zeros(64)}}, folder / f"rank{rank}.pth")
    check(str(folder), "--resume")  # complete shards pass
    data = (folder / "rank1.pth").read_bytes()
    (folder / "rank1.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="rank1.pth"):
        check(str(folder), "--resume")


def tiny_sd_vit(num_classes: int = 2) -> Dict[str, Any]:
    """MMPretrain ViT, 4 blocks of width 32 on 32x32 images (16 patches), with self-distillation exits."""
    arch = dict(embed_dims=32, num_layers=4, num_heads=2, feedforward_channels=64)
    return dict(
        type="SelfDistillClassifier",
        probe_size=32,
        backbone=dict(type="VisionTransformer", arch=arch, img_size=32, patch_size=8),
        neck=None,
        head=dict(type="VisionTransformerClsHead", num_classes=num_classes, in_channels=32),
    )


def fsdp_config(data: Path, work_dir: Path, strategy: str, crash_after_epoch: int = 0) -> Dict[str, Any]:
    cfg = mm_config(data, work_dir, model=tiny_sd_vit(), batch_size=4)
    cfg["custom_imports"]["imports"].append(STRATEGY_MODULE)
    cfg["train_dataloader"]["sampler"] = dict(type="DefaultSampler", shuffle=True)
    cfg["default_hooks"]["checkpoint"] = dict(type="CheckpointHook", interval=1, by_epoch=True)
    if crash_after_epoch:
        cfg["custom_hooks"].append(dict(type="CrashHook", after_epoch=crash_after_epoch))
    cfg.update(
        runner_type="FlexibleRunner",
        strategy=dict(type=strategy, model_wrapper=dict(type="MMFullyShardedDataParallel", device_id="cpu")),
        train_cfg=dict(by_epoch=True, max_epochs=EPOCHS),
        param_scheduler=[dict(type="MultiStepLR", by_epoch=True, milestones=[1], gamma=0.1)],
    )
    return cfg


def _probe(work_dir: Path, rank: int) -> Dict[str, Any]:
    info = json.loads((work_dir / f"probe_rank{rank}.json").read_text())
    info["params"] = torch.load(work_dir / f"probe_params_rank{rank}.pt", weights_only=True)
    info["optim"] = torch.load(work_dir / f"probe_optim_rank{rank}.pt", weights_only=False)
    return info


def _train(config: Path, *args: str, check: bool = True) -> Any:
    return torchrun(*TRAIN, str(config), "--launcher", "pytorch", *args, nproc=WORLD, check=check)


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resume_is_bitwise_exact(tmp_path):
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8)
    full = write_config(fsdp_config(data, tmp_path / "full", RESUMABLE_FSDP_STRATEGY), tmp_path / "full.py")
    _train(full)
    crash = fsdp_config(data, tmp_path / "part", RESUMABLE_FSDP_STRATEGY, crash_after_epoch=1)
    proc = _train(write_config(crash, tmp_path / "crash.py"), check=False)
    assert proc.returncode != 0 and "simulated crash after epoch 1" in proc.stderr
    shards = sorted(p.name for p in (tmp_path / "part" / "epoch_1.pth").iterdir())
    assert shards == [f"rank{r}.pth" for r in range(WORLD)]  # a sharded checkpoint: one file per rank
    part = write_config(fsdp_config(data, tmp_path / "part", RESUMABLE_FSDP_STRATEGY), tmp_path / "part.py")
    resumed = _train(part, "--resume")
    assert "resumed epoch: 1, iter: 2" in resumed.stdout + resumed.stderr

    for rank in range(WORLD):
        a, b = _probe(tmp_path / "full", rank), _probe(tmp_path / "part", rank)
        assert a["wrapper"] == b["wrapper"] == "MMFullyShardedDataParallel"
        assert [r["iter"] for r in b["records"]] == [r["iter"] for r in a["records"][2:]] == [2, 3]
        assert [(r["loss"], r["lr"]) for r in b["records"]] == [(r["loss"], r["lr"]) for r in a["records"][2:]]
        assert a["params"].keys() == b["params"].keys()
        assert sum(v.numel() for v in a["params"].values()) > 0  # this rank holds a shard
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        momenta = [
            (s["momentum_buffer"], b["optim"]["state"][k]["momentum_buffer"]) for k, s in a["optim"]["state"].items()
        ]
        assert momenta and all(torch.equal(x, y) for x, y in momenta)
