"""Under 8 threads at once, with batches of 1 to 32 images, EarlyExitModel and OnnxCascade give no error and
exactly the answers they give sequentially (a short run of ``tools/soak_early_exit.py``; its figures are not
asserted)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from tools import soak_early_exit as soak_tool  # noqa: E402

pytestmark = pytest.mark.timm

THREADS = 8


def test_short_soak_has_no_error_and_every_answer_is_the_sequential_one(tmp_path):
    report = soak_tool.main(
        ["--threads", str(THREADS), "--seconds", "1.2", "--rounds", "1", "--warmup", "0.2", "--batches", "16"]
    )
    assert [v["name"] for v in report["variants"]] == ["plain (torch)", "EarlyExitModel", "plain (ONNX)", "OnnxCascade"]
    assert report["warmup_errors"] == 0
    for v in report["variants"]:
        assert v["errors"] == 0, v["first_errors"]
        assert v["mismatches"] == 0, v["name"]
        assert v["calls"] >= THREADS, v  # every thread answered at least once
    assert min(report["batch_sizes"]) < 8 and max(report["batch_sizes"]) > 24
    assert len(report["exit_shares"]) >= 3  # the answers come from several exits, the deepest included or not
    assert report["rss_end_mib"] is None or report["rss_end_mib"] > 0


def test_a_call_that_shares_state_between_threads_is_caught(tmp_path):
    """The check itself: a model that answers from state another thread may have changed differs or fails."""
    shared = {}

    def racy(x: torch.Tensor) -> torch.Tensor:
        shared["x"] = x
        torch.tanh(torch.randn(64, 64)) @ torch.randn(64, 64)  # room for another thread to overwrite it
        return shared["x"].sum(dim=(1, 2, 3))

    variant = soak_tool.Variant("racy", racy, torch.equal)
    batches = soak_tool.make_batches(16, seed=0)
    report = soak_tool.soak([variant], batches, threads=THREADS, seconds=0.5, warmup_seconds=0)
    (v,) = report["variants"]
    assert v["errors"] + v["mismatches"] > 0
