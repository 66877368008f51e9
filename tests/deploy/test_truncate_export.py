import pytest
import torch
from deploy_toy import CountingStage, all_exit_logits, toy

from sd_plugin.deploy import TruncatedModel, exit_costs, export_onnx, truncate


def _params(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 1, 2])
def test_truncated_equals_exit_and_skips_later_stages(k):
    model, x = toy(), torch.randn(3, 3, 16, 16)
    ref = all_exit_logits(model, x)[k]
    small = truncate(model, exit=k + 1, example_input=x[:1])
    small.model.reset_calls()
    torch.testing.assert_close(small(x), ref)
    stages = small.model.net.stages
    # Stages after exit k are gone (their weights dropped) and those kept ran once on the batch.
    assert [isinstance(s, CountingStage) for s in stages] == [i <= k for i in range(3)]
    assert all(s.calls == [3] for s in stages if isinstance(s, CountingStage))
    assert _params(small) < _params(model)
    assert model.net.stages[2].conv.weight is not None  # the original is untouched


@torch.no_grad()
def test_without_example_keeps_weights_but_still_stops():
    model, x = toy(), torch.randn(2, 3, 16, 16)
    small = TruncatedModel(model, exit=1).eval()
    small.model.reset_calls()
    torch.testing.assert_close(small(x), all_exit_logits(model, x)[0])
    assert [s.calls for s in small.model.net.stages] == [[2], [], []]
    assert _params(small) == _params(model)


def test_bad_exit():
    with pytest.raises(ValueError, match="out of range"):
        TruncatedModel(toy(), exit=4)
    with pytest.raises(ValueError, match="out of range"):
        TruncatedModel(toy(), exit=0)
    with pytest.raises(ValueError, match="not an exit name"):
        TruncatedModel(toy(), exit="last")
    with pytest.raises(TypeError, match="int"):
        TruncatedModel(toy(), exit=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exit"):
        TruncatedModel(toy())


@torch.no_grad()
def test_exit_names_and_numbers():
    model, x = toy(), torch.randn(2, 3, 16, 16)
    ref = all_exit_logits(model, x)
    assert truncate(model, exit="deepest").exit == 3 and truncate(model, exit="exit2").exit_name == "exit2"
    torch.testing.assert_close(truncate(model, exit="exit2")(x), ref[1])
    torch.testing.assert_close(truncate(model, 2)(x), ref[1])  # positional: 1-based like the log's exit2
    assert TruncatedModel(model, 1).exit == 1 and not hasattr(TruncatedModel(model, 1), "exit_index")


def test_onnx_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = toy(), torch.randn(2, 3, 16, 16)
    small = truncate(model, exit=2, example_input=x[:1])
    path = export_onnx(small, x, tmp_path / "exit1.onnx")  # checks ONNX Runtime on x
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 16, 16)  # another batch size: the batch axis is dynamic
    got = torch.from_numpy(session.run(None, {"images": x5.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, all_exit_logits(model, x5)[1], atol=1e-4, rtol=1e-4)


def test_exit_costs_grow_with_depth():
    pytest.importorskip("mmengine")
    from mmengine.analysis import FlopAnalyzer

    model = toy()
    x = torch.randn(1, 3, 16, 16)
    costs = exit_costs(model, x)
    assert costs.flops[-1] == int(FlopAnalyzer(model.net, (x,)).total())  # the plain model, counted by mmengine
    assert costs.flops[0] < costs.flops[1] < costs.flops[2]
    assert costs.params[-1] == _params(model.net)
    assert costs.params[0] < costs.params[1] < costs.params[2]
    # Exit 0's backbone part is the stem and stage 0, measured on their own.
    stem_stage0 = torch.nn.Sequential(model.net.stem, model.net.stages[0])
    assert costs.flops[0] - costs.exit_flops[0] == int(FlopAnalyzer(stem_stage0, (x,)).total())
    assert costs.answer_costs()[2] == costs.flops[2] + sum(costs.exit_flops)


@torch.no_grad()
def test_run_segment_pieces_give_the_deepest_logits():
    """The one "run from point a to point b" (TruncatedModel and the ONNX cascade's segments use it)."""
    from sd_plugin.deploy.early_exit import run_segment

    model, x = toy(), torch.randn(2, 3, 16, 16)
    example = torch.randn(1, 3, 16, 16)
    f0 = run_segment(model, x, stop=0)
    f1 = run_segment(model, f0, start=0, stop=1, example=example)
    torch.testing.assert_close(run_segment(model, f1, start=1, example=example), model.forward_deepest(x))
    with pytest.raises(ValueError, match="needs example images"):
        run_segment(model, f0, start=0)
