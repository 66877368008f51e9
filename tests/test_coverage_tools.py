"""The coverage tools: subprocess runner (limits, crashes), which MMPretrain configs count, and the checks."""

from __future__ import annotations

import os
import time
from typing import Any, Dict

import pytest
import torch

from tools._coverage import BROKEN, FAIL, OK, SLOW, markdown_table, run_checks, summarize


def _sleep(seconds: float) -> Dict[str, Any]:
    time.sleep(seconds)
    return dict(status=OK)


def _crash() -> Dict[str, Any]:
    os._exit(3)  # dies without sending a result


def _raise() -> Dict[str, Any]:
    raise RuntimeError("boom")


def _slow_but_extends(seconds: float, extend_limit: Any = None) -> Dict[str, Any]:
    extend_limit(60.0)
    time.sleep(seconds)
    return dict(status=OK)


def test_run_checks_limits_crashes_and_extensions() -> None:
    tasks = [
        ("quick", (0.0,), 30.0),
        ("hangs", (60.0,), 1.0),
    ]
    got = dict(run_checks(_sleep, tasks, jobs=2))
    assert got["quick"]["status"] == OK
    assert got["hangs"]["status"] == SLOW and "1 s limit" in got["hangs"]["error"]
    assert got["hangs"]["seconds"] < 30

    crashed = dict(run_checks(_crash, [("c", (), 30.0)]))["c"]
    assert crashed["status"] == FAIL and "exit code 3" in crashed["error"]
    raised = dict(run_checks(_raise, [("r", (), 30.0)]))["r"]
    assert raised["status"] == FAIL and "RuntimeError: boom" in raised["error"]
    # the limit was 1 s, the check raised it to 60 s before sleeping 2 s
    extended = dict(run_checks(_slow_but_extends, [("e", (2.0,), 1.0)]))["e"]
    assert extended["status"] == OK, extended


def test_summary_counts_everything_but_ok_as_failure() -> None:
    results = {
        "a/1": dict(status=OK),
        "a/2": dict(status=FAIL, error="x"),
        "b/1": dict(status=BROKEN, error="y"),
        "b/2": dict(status=SLOW, error="z"),
    }
    summary = summarize(results, lambda k: k.split("/")[0])
    assert summary["overall"]["total"] == 4 and summary["overall"]["fraction_ok"] == 0.25
    assert summary["families"]["a"]["fraction_ok"] == 0.5 and summary["families"]["b"]["fraction_ok"] == 0.0
    table = markdown_table(summary, "family")
    assert "| a | 1 | 1 | 0 | 0 | 2 | 50.0 |" in table and "| **all** | 1 | 1 | 1 | 1 | 4 | 25.0 |" in table


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_mmpretrain_configs_counted_and_excluded() -> None:
    from tools.coverage_mmpretrain import enumerate_configs, input_size

    counted, excluded = enumerate_configs("*")
    assert len(counted) > 400
    assert "resnet/resnet18_8xb16_cifar10.py" in counted and input_size(
        counted["resnet/resnet18_8xb16_cifar10.py"]
    ) == (
        32,
        32,
    )
    assert input_size(counted["vision_transformer/vit-base-p16_64xb64_in1k-384px.py"]) == (384, 384)
    # built for 384 px (backbone img_size) while the inherited training pipeline still crops 224
    assert input_size(counted["tinyvit/tinyvit-21m-distill_8xb256_in1k-384px.py"]) == (384, 384)
    assert excluded["mae/mae_vit-base-p16_8xb512-amp-coslr-300e_in1k.py"].startswith("self-supervised")
    assert "without a head" in excluded["dinov2/vit-small-p14_dinov2-pre_headless.py"]
    # mmengine cannot load these; their model base file says ImageClassifier, so they count (as failures)
    assert isinstance(counted["replknet/replknet-31B_32xb64_in1k.py"], str)


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_mmpretrain_check_of_one_config() -> None:
    from mmengine import Config

    from tools.coverage_mmpretrain import CONFIG_ROOT, check_config, model_cfg

    cfg = Config.fromfile(os.path.join(CONFIG_ROOT, "resnet/resnet18_8xb16_cifar10.py"))
    r = check_config(model_cfg(cfg), (32, 32), 0, 4e8)
    assert r["status"] == OK, r
    assert r["loss_exact"] and r["size"] == [32, 32] and r["num_exits"] == 3


@pytest.mark.slow
@pytest.mark.timm
def test_timm_check_of_one_architecture() -> None:
    from tools.coverage_timm import check

    r = check("test_resnet", 32, (1e9, 1e9, 60.0))
    assert r["status"] == OK, r
    assert r["input_size"] == [3, 32, 32] and r["num_exits"] >= 1


def test_placement_problems_are_named() -> None:
    from types import SimpleNamespace

    import torch.nn as nn

    from tools._coverage import placement_problem

    backbone = nn.Module()
    backbone.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()) for _ in range(4))

    def model(*names: str) -> SimpleNamespace:
        points = [SimpleNamespace(module=n) for n in names]
        return SimpleNamespace(exit_points=points, tapped_module=lambda: backbone)  # no exit_engine: names only

    assert placement_problem(model("stages.0", "stages.1", "stages.2"), None) is None
    assert "the last of the 4 modules in 'stages'" in placement_problem(model("stages.1", "stages.3"), None)
    assert "nested" in placement_problem(model("stages.1", "stages.1.0"), None)
    assert "nested" in placement_problem(model("stages.2", "stages.2"), None)
    # the last block of each stage's block list (Twins-SVT's stages.0.1, stages.1.1, ...) is a stage end
    assert placement_problem(model("stages.0.1", "stages.1.1", "stages.2.1"), None) is None
    # numbered stage lists (CoaT's serial_blocks1..4): the last block of each but the last is a stage end
    for i in range(1, 5):
        setattr(backbone, f"serial_blocks{i}", nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(2)))
    assert placement_problem(model("serial_blocks1.1", "serial_blocks2.1", "serial_blocks3.1"), None) is None
    assert "in 'serial_blocks4'" in placement_problem(model("serial_blocks2.1", "serial_blocks4.1"), None)


class _StagesThenHead(torch.nn.Module):
    """Three strided stages in a list, then a head convolution (strided or not) inside ``forward_features``."""

    def __init__(self, head_stride: int) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.stages = torch.nn.ModuleList([conv(3, 8, 3, 2, 1), conv(8, 8, 3, 2, 1), conv(8, 8, 3, 2, 1)])
        self.head = conv(8, 8, 3, head_stride, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


class _WithExits:
    """The least of a MultiExitModel the placement check reads: exits after stages 1 and 2 (the list's last)."""

    def __init__(self, net: torch.nn.Module) -> None:
        from sd_plugin.core import ExitPoint
        from sd_plugin.core.engine import ExitEngine

        self.net = net
        self.exit_points = [ExitPoint("stages.1", "NCHW", 8, stride=2), ExitPoint("stages.2", "NCHW", 8, stride=1)]
        self.exit_engine = ExitEngine(net, self.exit_points)

    def tapped_module(self) -> torch.nn.Module:
        return self.net

    def forward_deepest(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_last_block_before_more_downsampling_is_a_stage_end() -> None:
    """A container's last block is the deepest stage only when nothing downsamples after it (SelecSLS: head convs)."""
    from tools._coverage import placement_problem

    x = torch.randn(2, 3, 64, 64)
    assert placement_problem(_WithExits(_StagesThenHead(head_stride=2)), x) is None
    flagged = placement_problem(_WithExits(_StagesThenHead(head_stride=1)), x)
    assert flagged == "exit at 'stages.2', the last of the 3 modules in 'stages'"
