"""The core exit engine: main-path discovery from the probe, layouts, strides, and the per-thread taps."""

from __future__ import annotations

import copy
import threading
from typing import Any, List

import pytest
import torch
import torch.nn as nn

import sd_plugin.core.engine._find as engine_module
from sd_plugin.core import SelfDistillConfig
from sd_plugin.core.engine import ExitEngine, ExitPoint, StopForward, find_exit_layout, select_feature
from sd_plugin.core.engine._cuts import is_cut, is_value_cut
from sd_plugin.core.engine._points import replace_feature
from sd_plugin.core.engine._probe import probe_mode

CFG = SelfDistillConfig()


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = _conv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class NumberedStages(nn.Module):
    """VAN-style: stages are attributes block1..block4, called in a loop by name, no stage container."""

    def __init__(self) -> None:
        super().__init__()
        widths = [8, 16, 24, 32]
        for i, (cin, cout) in enumerate(zip([3, *widths[:-1]], widths), 1):
            setattr(self, f"down{i}", _conv(cin, cout, 4 if i == 1 else 2))
            setattr(self, f"block{i}", Residual(cout))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"block{i}")(getattr(self, f"down{i}")(x))
        return self.fc(x.mean((2, 3)))


class BatchReshape(NumberedStages):
    """Twins-style: reshapes with the batch size read from the input, so a hook cannot hand on fewer samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        for i in range(1, 5):
            x = getattr(self, f"block{i}")(getattr(self, f"down{i}")(x))
            x = x.reshape(b, x.shape[1], -1).reshape(b, x.shape[1], x.shape[2], -1)
        return self.fc(x.mean((2, 3)))


class TwoBranchStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hi, self.lo = _conv(8, 8, 2), _conv(8, 16, 4)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [self.hi(x), self.lo(x)]


class TwoBranch(nn.Module):
    """HRNet-style: stages hand on a list of maps at two resolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, 8, 2)
        self.stages = nn.ModuleList(TwoBranchStage() for _ in range(3))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            hi, lo = stage(x)
            x = hi + nn.functional.interpolate(lo[:, :8], size=hi.shape[-2:])
        return self.fc(lo.mean((2, 3)))


class TokenBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Tokens5D(nn.Module):
    """HiViT-style: channels-last token groups (N, L, h, w, C) before plain tokens; blocks in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.ModuleList(TokenBlock() for _ in range(6))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # N, C, 8, 8
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, 2, 2, c)
        for blk in self.blocks:
            x = blk(x)
        return self.fc(x.mean((1, 2, 3)))


def _layout(model: nn.Module, size: int = 64, **kw: Any) -> Any:
    return find_exit_layout(model, model, (3, size, size), CFG, **kw)


def test_cut_test_tells_main_path_from_residual_branch() -> None:
    model = NumberedStages().eval()
    x = torch.randn(3, 3, 64, 64)
    with probe_mode(model, meta=False):
        assert is_cut(model, "block2", model, x) and is_value_cut(model, "block2", model, x)
        assert not is_cut(model, "block2.branch", model, x)  # x + branch(x): the shortcut still carries 3 samples
        assert not is_value_cut(model, "block2.branch", model, x)


@pytest.mark.parametrize("probe", ["meta", "real"])
def test_numbered_stage_attributes_found_without_names(probe: str) -> None:
    layout = _layout(NumberedStages(), probe=probe)
    assert layout.kind == "stage" and layout.probed_on == ("meta" if probe == "meta" else "cpu")
    assert layout.positions == ("block1", "block2", "block3", "block4")
    assert [(p.module, p.fmt, p.channels, p.stride) for p in layout.points] == [
        ("block1", "NCHW", 8, 8),
        ("block2", "NCHW", 16, 4),
        ("block3", "NCHW", 24, 2),
    ]
    assert all(p.shrinkable for p in layout.points)


def test_small_model_is_probed_for_real_and_large_one_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    # The choice is a timing: a real forward faster than the meta trace (Python shape functions per op) wins.
    model = NumberedStages()
    assert engine_module._real_forward_seconds(model, model, (3, 64, 64), torch.float32, torch.device("cpu")) > 0
    with monkeypatch.context() as m:
        m.setattr(engine_module, "_real_forward_seconds", lambda *a: 0.0)
        assert _layout(model).probed_on == "cpu"
    monkeypatch.setattr(engine_module, "REAL_TRIAL_PARAMS", 0)  # "large": not even timed for real
    assert engine_module._real_forward_seconds(model, model, (3, 64, 64), torch.float32, torch.device("cpu")) > 1e9
    assert _layout(model).probed_on == "meta"


def test_batch_reshaping_backbone_gets_exits_that_cannot_shrink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "REAL_TRIAL_PARAMS", 0)  # start on meta, as a large model would
    layout = _layout(BatchReshape())
    assert layout.probed_on == "cpu"  # the shrink test fails everywhere on meta, so the value test (real) decides
    assert [p.module for p in layout.points] == ["block1", "block2", "block3"]
    assert not any(p.shrinkable for p in layout.points)


def test_multi_branch_stages_read_their_lowest_resolution_map() -> None:
    layout = _layout(TwoBranch())
    assert layout.kind == "stage"
    assert [p.output_index for p in layout.points] == [1, 1]
    assert [p.channels for p in layout.points] == [16, 16]


def test_channels_last_token_groups_are_read_as_tokens() -> None:
    model = Tokens5D()
    layout = _layout(model)
    assert layout.kind == "block" and [p.module for p in layout.points] == ["blocks.1", "blocks.2", "blocks.3"]
    assert all(p.fmt == "NLC" and p.channels == 16 for p in layout.points)
    engine = ExitEngine(model, layout.points)
    with engine.capture() as cap:
        model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in cap.features] == [(2, 256, 16)] * 3
    assert select_feature(torch.zeros(2, 4, 2, 2, 16), layout.points[0]).shape == (2, 16, 16)


def test_meta_device_model_is_probed_on_meta() -> None:
    with torch.device("meta"):
        model = NumberedStages()
    layout = _layout(model)
    assert layout.probed_on == "meta" and [p.module for p in layout.points] == ["block1", "block2", "block3"]


def _engine() -> Any:
    torch.manual_seed(0)
    model = NumberedStages().eval()
    return model, ExitEngine(model, _layout(model).points)


def test_taps_are_inert_outside_a_session_and_removable() -> None:
    model, engine = _engine()
    x = torch.randn(4, 3, 64, 64)
    before = model(x)
    assert engine.installed and len(model.block1._forward_hooks) == 1
    assert torch.equal(model(x), before)
    engine.remove()
    assert not engine.installed and not model.block1._forward_hooks
    engine.ensure_installed()
    with engine.capture() as cap:
        model(x)
    assert [f.shape[1] for f in cap.features] == [8, 16, 24]


def test_run_to_stops_the_forward_after_the_exit() -> None:
    model, engine = _engine()
    calls: List[str] = []
    for name in ("block2", "down3", "block3", "fc"):
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: calls.append(n))
    feature = engine.run_to(1, lambda: model(torch.randn(2, 3, 64, 64)))
    assert feature.shape == (2, 16, 8, 8) and calls == ["block2"]


def test_run_segment_chains_to_the_whole_forward() -> None:
    """Images -> point 0 -> point 1 -> logits, each piece fed only the previous piece's result."""
    model, engine = _engine()
    x = torch.randn(2, 3, 64, 64)
    other = torch.randn(2, 3, 64, 64)
    f0 = engine.run_segment(lambda: model(x), stop=0)
    f1 = engine.run_segment(lambda: model(other), start=0, value=f0, stop=1)
    logits = engine.run_segment(lambda: model(other), start=1, value=f1)
    assert torch.equal(f0, engine.run_to(0, lambda: model(x)))
    assert torch.allclose(logits, model(x), atol=1e-6)
    assert torch.equal(model(x), model(x))  # no session left behind


def test_run_segment_errors() -> None:
    model, engine = _engine()
    x = torch.randn(2, 3, 64, 64)
    f1 = engine.run_to(1, lambda: model(x))
    with pytest.raises(ValueError, match="out of range"):
        engine.run_segment(lambda: model(x), stop=len(engine.points))
    with pytest.raises(ValueError, match="out of range"):
        engine.run_to(True, lambda: model(x))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start=1, stop=0"):
        engine.run_segment(lambda: model(x), start=1, value=f1, stop=0)
    with pytest.raises(ValueError, match="both start and value"):
        engine.run_segment(lambda: model(x), start=1)
    with pytest.raises(RuntimeError, match="never reached exit point 'block3'"):
        engine.run_segment(lambda: model.block1(model.down1(x)), stop=2)
    with pytest.raises(RuntimeError, match="never reached exit point 'block2'"):
        engine.run_segment(lambda: model.block1(model.down1(x)), start=1, value=f1)


def test_replace_feature_inverts_select_feature() -> None:
    new = torch.zeros(2, 4)
    pre = ExitPoint("m", "NC", 4, hook="forward_pre")
    args = (torch.ones(2, 4), "mask")
    assert replace_feature(args, pre, new) == (new, "mask")
    second = ExitPoint("m", "NC", 4, output_index=1)
    out = [torch.ones(2, 1), torch.ones(2, 4)]
    got = replace_feature(out, second, new)
    assert isinstance(got, list) and got[0] is out[0] and got[1] is new
    groups = ExitPoint("m", "NLC", 8)
    tokens = torch.randn(2, 3, 2, 2, 8)  # channels-last token groups: select_feature flattens them
    back = replace_feature(tokens, groups, select_feature(tokens, groups))
    assert torch.equal(back, tokens)
    with pytest.raises(TypeError, match="output_index"):
        replace_feature({"a": new}, ExitPoint("m", "NC", 4), new)


def test_intercept_hands_on_fewer_samples() -> None:
    model, engine = _engine()
    x = torch.randn(4, 3, 64, 64)

    def keep_last_two(k: int, feature: torch.Tensor, value: Any) -> Any:
        return value[2:] if k == 0 else None

    with engine.intercept(keep_last_two):
        out = model(x)
    assert torch.allclose(out, model(x[2:]), atol=1e-6)

    def stop(k: int, feature: torch.Tensor, value: Any) -> Any:
        raise StopForward

    with pytest.raises(StopForward), engine.intercept(stop):
        model(x)
    assert torch.equal(model(x), model(x))  # no session left behind


def test_one_engine_serves_many_threads() -> None:
    model, engine = _engine()
    inputs = [torch.randn(2 + i, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    expected = []
    for x in inputs:
        with engine.capture() as cap:
            model(x)
        expected.append(cap.features)
    results: List[Any] = [None] * len(inputs)
    errors: List[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                with engine.capture() as cap:
                    model(inputs[i])
                feats = cap.features
                assert all(torch.equal(a, b) for a, b in zip(feats, expected[i]))
            results[i] = feats
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r is not None for r in results)


def test_deepcopy_gives_an_independent_engine_bound_to_the_copy() -> None:
    model, engine = _engine()
    holder = nn.Module()
    holder.model = model
    holder.engine = engine  # type: ignore[assignment]
    twin = copy.deepcopy(holder)
    with torch.no_grad():
        twin.model.block1.branch[0].weight.mul_(2)
    x = torch.randn(2, 3, 64, 64)
    with twin.engine.capture() as cap:
        twin.model(x)
    with engine.capture() as orig:
        model(x)
    assert not torch.equal(cap.features[0], orig.features[0])
    assert twin.engine.root is twin.model


def test_capture_refuses_a_module_that_runs_twice() -> None:
    model, _ = _engine()
    engine = ExitEngine(model, [ExitPoint("block1", "NCHW", 8)])

    def twice(x: torch.Tensor) -> torch.Tensor:
        return model.block1(model.block1(model.down1(x)))

    with pytest.raises(RuntimeError, match="ran more than once"), engine.capture():
        twice(torch.randn(2, 3, 64, 64))


def test_stage_less_model_error_names_the_way_out() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(ValueError, match="cannot find where to put exits in Flat.*stage_modules"):
        _layout(Flat(), fix="Name its stages with stage_modules=[...].")


def test_half_precision_model_is_probed() -> None:
    model = NumberedStages().to(torch.bfloat16)
    layout = _layout(model)
    assert [p.module for p in layout.points] == ["block1", "block2", "block3"]


class _OutsideAutograd(torch.autograd.Function):
    """Runs a module without recording it, as reversible backbones (RevViT's ``RevBackProp``) do in training."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module) -> torch.Tensor:  # type: ignore[override]
        with torch.no_grad():
            return module(x).clone()  # block2's own output stays inside, unrecorded (autograd marks only this one)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        return grad, None


class DetachedStage(NumberedStages):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"down{i}")(x)
            block = getattr(self, f"block{i}")
            x = _OutsideAutograd.apply(x, block) if i == 2 else block(x)
        return self.fc(x.mean((2, 3)))


def test_features_computed_outside_autograd_are_refused_frozen_ones_are_not() -> None:
    model = DetachedStage().train()
    engine = ExitEngine(model, _layout(model).points)
    with engine.capture() as cap:
        model(torch.randn(2, 3, 64, 64))
    assert [f.requires_grad for f in cap.features] == [True, False, True]
    with pytest.raises(ValueError, match=r"\['block2'\] carry no gradient.*no_custom_backward"):
        engine.check_gradients(cap.features)
    with torch.no_grad():
        engine.check_gradients(cap.features)  # no autograd pass: nothing to check
    model.block2.requires_grad_(False)  # a frozen stage: detached features are expected there
    engine.check_gradients(cap.features)


class WritesIntoInput(NumberedStages):
    """TNT-style: each later stage writes into the tensor the stage before returned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"block{i}")(getattr(self, f"down{i}")(x))
            returned = x
            x = x.clone()
            returned.mul_(0.0)  # the stage's output, overwritten after it returned (a clone hands on the value)
        return self.fc(x.mean((2, 3)))


def test_outputs_written_later_in_place_are_copied_at_the_tap() -> None:
    model = WritesIntoInput().eval()
    points = _layout(model, probe="meta").points
    assert [p.copy for p in points] == [True] * 3
    assert not any(p.copy for p in _layout(NumberedStages(), probe="meta").points)
    engine = ExitEngine(model, points)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with engine.capture() as cap:
            model(x)
        want = model.block1(model.down1(x))
    torch.testing.assert_close(cap.features[0], want, rtol=0, atol=0)
    assert cap.features[0].abs().sum() > 0
