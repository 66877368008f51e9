"""The ONNX cascade answers as EarlyExitModel does, and each segment graph holds only its own stage."""

import json

import numpy as np
import pytest
import torch
from deploy_toy import toy

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from sd_plugin.deploy import EarlyExitModel, ExitPolicy, collect_exit_logits  # noqa: E402
from sd_plugin.deploy.onnx_cascade import OnnxCascade, export_cascade  # noqa: E402


def _midpoint_thresholds(model, x, quantiles):
    """Thresholds half-way between two samples' confidences (no sample sits on a threshold)."""
    conf = collect_exit_logits(model, [(x, torch.zeros(len(x)))]).logits[:-1].softmax(-1).max(-1).values
    out = []
    for c, q in zip(conf, quantiles):
        s = c.sort().values
        i = int(q * (len(s) - 1))
        out.append(float((s[i] + s[i + 1]) / 2))
    return out


def _check_same_answers(model, x, policy, tmp_path):
    export_cascade(model, x[:4], tmp_path, policy)
    cascade = OnnxCascade(tmp_path)
    with torch.no_grad():
        want = EarlyExitModel(model, policy).eval()(x)
    got = cascade(x.numpy())
    assert np.array_equal(got.exit, want.exit.numpy())
    assert got.samples_per_stage == want.samples_per_stage
    np.testing.assert_allclose(got.logits, want.logits.numpy(), rtol=0, atol=1e-4)
    return want


def _convs(path):
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def test_toy_cascade_equals_early_exit_model_and_segments_hold_their_stage_only(tmp_path):
    model, x = toy(seed=3), torch.randn(24, 3, 16, 16)
    policy = ExitPolicy(_midpoint_thresholds(model, x, (0.6, 0.5)))
    want = _check_same_answers(model, x, policy, tmp_path)
    assert sorted(set(want.exit.tolist())) == [1, 2, 3]  # every exit answers some samples
    # segment0 = stem + stage 0, segment1 = stage 1, segment2 = stage 2 + head: no earlier stage's conv.
    assert [_convs(tmp_path / f"segment{i}.onnx") for i in range(3)] == [2, 1, 1]
    weights = {
        i: {tuple(t.dims) for t in onnx.load(str(tmp_path / f"segment{i}.onnx")).graph.initializer} for i in range(3)
    }
    assert (8, 3, 3, 3) not in weights[1] | weights[2]  # the stem's kernel lives in segment0 only
    assert (16, 8, 3, 3) not in weights[0] | weights[2]
    manifest = json.loads((tmp_path / "cascade.json").read_text())
    assert manifest["thresholds"] == policy.thresholds and manifest["criterion"] == "max_prob"


def test_all_answered_early_and_thresholds_override(tmp_path):
    model, x = toy(seed=3), torch.randn(5, 3, 16, 16)
    export_cascade(model, x, tmp_path, ExitPolicy([0.0, 0.0]))
    out = OnnxCascade(tmp_path)(x.numpy())
    assert out.exit.tolist() == [1] * 5 and out.samples_per_stage == [5, 0, 0]
    deepest = OnnxCascade(tmp_path, thresholds=[None, None])(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(deepest.logits, model.forward_deepest(x).numpy(), rtol=0, atol=1e-4)
    assert deepest.exit.tolist() == [3] * 5


@pytest.mark.parametrize("criterion", ["max_prob", "margin", "entropy"])
def test_timm_cascade_equals_early_exit_model(tmp_path, criterion):
    pytest.importorskip("timm")
    from deploy_toy import wrapped_test_resnet

    model = wrapped_test_resnet()
    x = torch.randn(16, 3, 32, 32)
    ts = _midpoint_thresholds(model, x, (0.7, 0.6, 0.5))
    if criterion == "margin":  # half-way between two samples' margins at the median
        p = collect_exit_logits(model, [(x, torch.zeros(16))]).logits[:-1].softmax(-1).sort(-1).values
        margins = p[..., -1] - p[..., -2]
        ts = [float(m.sort().values[len(m) // 2 - 1 : len(m) // 2 + 1].mean()) for m in margins]
    if criterion == "entropy":  # the same decisions expressed as entropy bounds would differ; use fresh ones
        ent = collect_exit_logits(model, [(x, torch.zeros(16))]).logits[:-1].softmax(-1)
        ent = -(ent * ent.log()).sum(-1)
        ts = [float(e.sort().values[len(e) // 2 - 1 : len(e) // 2 + 1].mean()) for e in ent]
    want = _check_same_answers(model, x, ExitPolicy(ts, criterion), tmp_path)
    assert len(set(want.exit.tolist())) >= 2
