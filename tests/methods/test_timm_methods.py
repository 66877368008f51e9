"""The methods on the timm route: ``sd-plugin train-timm --pskd --cs-kd --tfkd`` trains, saves and resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

timm = pytest.importorskip("timm")

from sd_plugin.cli import train_timm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "demo_data" / "cifar10_mini"
pytestmark = [pytest.mark.timm, pytest.mark.slow]
ARGS = [
    "--model", "test_resnet", "--img-size", "32", "-b", "8", "--max-train-samples", "32", "--max-val-samples", "8",
    "--workers", "0", "--no-progress", "--epochs", "2",
    "--pskd", "--cs-kd", "--tfkd", "--smoothing", "0.1", "--mixup", "0.2", "--sd-no-exits",
]  # fmt: skip


class _Stop(Exception):
    pass


def _train(out: Path, *extra: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed float summation order, so runs compare bitwise
    try:
        train_timm.main([str(DATA), *ARGS, "--output", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


def _ckpt(out: Path) -> Any:
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)


def test_pskd_state_is_saved_and_resumed_bitwise_with_cskd_tfkd_label_smoothing_and_mixup(tmp_path, monkeypatch):
    _train(tmp_path / "straight")
    real, calls = train_timm.train_one_epoch, {"n": 0}

    def stop_before_epoch_2(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(train_timm, "train_one_epoch", stop_before_epoch_2)
    with pytest.raises(_Stop):
        _train(tmp_path / "split")
    past = _ckpt(tmp_path / "split")["criterion"]["_extra_state"]["pskd_past"]
    # After epoch 1, exactly the images of epoch 1's class pairs have a stored prediction.
    from sd_plugin.core.methods import ClassPairIndexSampler
    from sd_plugin.timm_adapter._train_utils import build_dataset, labels_of

    train_set, _ = build_dataset(str(DATA), "train", None, 32, seed=42)
    epoch1 = sorted(set(ClassPairIndexSampler(labels_of(train_set), 0, 1, seed=42)))
    assert torch.nonzero(past["seen"]).flatten().tolist() == epoch1
    monkeypatch.setattr(train_timm, "train_one_epoch", real)
    _train(tmp_path / "split", "--resume", str(tmp_path / "split" / "checkpoint-last.pth"))
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "split")
    pa, pb = a["criterion"]["_extra_state"]["pskd_past"], b["criterion"]["_extra_state"]["pskd_past"]
    assert torch.equal(pa["probs"], pb["probs"]) and torch.equal(pa["seen"], pb["seen"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert set(a["history"][-1]["terms"]) == {"loss_ce", "loss_pskd", "loss_cskd", "loss_tfkd"}
