"""One process-group set-up (sd_plugin._dist.init_process_group_from_env) for both training routes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

from sd_plugin import _dist
from sd_plugin.timm_adapter._train_utils import setup_distributed

TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.fixture
def inits(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    """The calls to torch's init_process_group (none is made for real), with torchrun's variables set."""
    calls: List[Dict[str, Any]] = []
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    return calls


def test_timm_route_starts_the_group_in_the_one_home(inits: List[Dict[str, Any]]) -> None:
    info = setup_distributed("cpu", 30.0)
    assert (info.rank, info.world_size, info.device) == (1, 2, torch.device("cpu"))
    assert inits == [dict(backend="gloo", init_method="env://", rank=1, world_size=2, timeout=timedelta(seconds=30))]
    setup_distributed("cpu")  # --dist-timeout not given: torch's default
    assert inits[-1]["timeout"] is None


def test_mm_route_keeps_its_timeout_default(inits: List[Dict[str, Any]]) -> None:
    env = _dist.init_process_group_from_env("gloo")
    assert env == _dist.DistEnv(rank=1, local_rank=1, world_size=2)
    assert inits[-1]["timeout"] == timedelta(seconds=1800)


def test_timm_route_without_torchrun_says_how_to_launch(
    inits: List[Dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match=r"WORLD_SIZE > 1.*\['MASTER_PORT'\] are not set.*-m sd_plugin train-timm"):
        setup_distributed("cpu")
    with pytest.raises(ValueError, match=r"--launcher pytorch needs .*-m sd_plugin train CONFIG"):
        _dist.init_process_group_from_env("gloo")
    assert not inits


def test_single_process_starts_no_group(inits: List[Dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not setup_distributed("cpu").distributed and not inits
    with pytest.raises(ValueError, match="positive"):
        setup_distributed("cpu", 0.0)
