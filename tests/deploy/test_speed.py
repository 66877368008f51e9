"""measure_speedup: the figures it promises, ONNX exactly when asked for and possible (no timing is asserted)."""

import importlib.util
import math

import pytest
import torch

timm = pytest.importorskip("timm")
import sd_plugin  # noqa: E402
from sd_plugin.deploy import ExitPolicy, measure_speedup  # noqa: E402
from sd_plugin.deploy import speed as speed_module  # noqa: E402
from sd_plugin.deploy._timing import BATCH_TIMED, timed_inputs  # noqa: E402

pytestmark = pytest.mark.timm

EAGER = {f"eager_{k}_{b}" for k in ("speedup", "aa") for b in ("b1", "b32")}
ONNX = {f"onnx_{k}_{b}" for k in ("speedup", "aa") for b in ("b1", "b32")}
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sd_plugin.wrap(timm.create_model("test_resnet", num_classes=5), input_size=(3, 32, 32)).eval()


def _check(speed, keys):
    assert set(speed) == keys
    assert all(math.isfinite(v) and v > 0 for v in speed.values()), speed


@pytest.mark.parametrize("onnx", [None, False])
def test_keys_and_ratios(model, onnx):
    policy, images = ExitPolicy([0.3, None, 0.2]), torch.randn(5, 3, 32, 32)
    speed = measure_speedup(model, policy, images, b1_images=2, repeats=1, onnx=onnx)
    _check(speed, EAGER | (ONNX if HAS_ONNX and onnx is None else set()))


def test_onnx_only_when_it_can_run(model, monkeypatch):
    monkeypatch.setattr(speed_module, "missing_onnx_modules", lambda: ["onnxruntime"])
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(ValueError, match="cannot time ONNX Runtime: needs onnxruntime"):
        measure_speedup(model, [0.5, 0.5, 0.5], x, b1_images=1, repeats=1, onnx=True)
    _check(measure_speedup(model, [0.5, 0.5, 0.5], x, b1_images=1, repeats=1), EAGER)


def test_timed_inputs_are_the_first_images_and_one_batch_of_32():
    images = torch.arange(5.0)[:, None, None, None].expand(5, 3, 2, 2)
    ones, b32 = timed_inputs(images, 3)
    assert [x.shape for x in ones] == [(1, 3, 2, 2)] * 3 and torch.equal(torch.cat(ones), images[:3])
    assert b32.shape == (BATCH_TIMED, 3, 2, 2) and b32[:, 0, 0, 0].tolist() == [i % 5 for i in range(BATCH_TIMED)]


def test_a_model_the_cascade_cannot_cut_is_timed_eager_only_unless_onnx_is_demanded(tmp_path):
    import dataclasses

    from deploy_toy import toy

    from sd_plugin.core.engine import ExitEngine
    from sd_plugin.deploy import export_cascade

    model = toy(seed=1)
    model.exit_engine.remove()
    model.points = [model.points[0], dataclasses.replace(model.points[1], shrinkable=False)]
    model.exit_engine = ExitEngine(model.net, model.points)
    model.eval()
    x, policy = torch.randn(3, 3, 16, 16), ExitPolicy([0.5, 0.5])
    if HAS_ONNX:  # the reason is the cascade export's own
        assert "exit point(s) [2] cannot hand on fewer samples" in (speed_module.onnx_unavailable(model) or "")
        with pytest.raises(ValueError, match=r"exit point\(s\) \[2\]"):
            export_cascade(model, x, tmp_path, policy)
        with pytest.raises(ValueError, match="cannot time ONNX Runtime: exit point"):
            measure_speedup(model, policy, x, b1_images=1, repeats=1, onnx=True)
    _check(measure_speedup(model, policy, x, b1_images=1, repeats=1), EAGER)


def test_primed_rounds_call_each_unit_once_unmeasured_right_before_its_timed_call(monkeypatch):
    """``prime=True``: every unit runs twice in a row, the second call timed, in ABBA order; without it once."""
    from sd_plugin.deploy import _timing

    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: next(clock))

    def unit(name):
        return lambda i: calls.append((name, i))

    fns = {"a": unit("a"), "b": unit("b")}
    times = _timing.interleaved_times(fns, rounds=2, warmup=0, prime=True)
    assert calls == [("a", 0), ("a", 0), ("b", 0), ("b", 0), ("b", 1), ("b", 1), ("a", 1), ("a", 1)]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}  # one timed call per round
    calls.clear()
    _timing.interleaved_times(fns, rounds=2, warmup=0)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
