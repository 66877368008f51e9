"""Early exit in PyTorch's channels-last memory format (``sd-plugin report --channels-last``): the same routing and,
up to float rounding, the same logits as the contiguous model, on the timm and the MMPretrain route."""

import copy
import json
from pathlib import Path

import pytest
import torch

from sd_plugin.deploy import EarlyExitModel, collect_exit_logits

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "configs" / "demo" / "sd_resnet18-w16_cifar10-mini.py"
DATA = ROOT / "demo_data" / "cifar10_mini"
#: Float rounding between the two memory formats (different convolution kernels), on logits of order 1-10.
ATOL = 1e-4
#: Confidence quantile of each exit's threshold: the batch mixes every exit.
QUANTILES = (0.7, 0.6, 0.5)
#: Scores on either side of the quantile searched for a wide gap.
SPAN = 6


def _timm_model():
    pytest.importorskip("timm")
    from deploy_toy import wrapped_test_resnet

    return wrapped_test_resnet()


def _mm_model():
    pytest.importorskip("mmpretrain")
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    import sd_plugin.mmpretrain_adapter  # noqa: F401

    cfg = Config.fromfile(str(DEMO_CONFIG))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    with torch.no_grad():
        for p in [*model.exit_heads.parameters(), *model.head.parameters()]:
            p.add_(torch.randn_like(p))
    return model.eval()


def _threshold_near(conf: torch.Tensor, q: float) -> float:
    """A threshold near ``conf``'s ``q`` quantile, in the middle of the widest gap between the nearby scores, so no
    sample sits on its edge."""
    s = conf.sort().values
    k = int(q * len(s))
    lo, hi = max(k - SPAN, 0), min(k + SPAN, len(s) - 1)
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


@pytest.mark.parametrize("build", [_timm_model, _mm_model], ids=["timm", "mmpretrain"])
@torch.no_grad()
def test_channels_last_routes_and_answers_as_the_contiguous_model(build):
    model = build()
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    conf = collect_exit_logits(model, [(x, torch.zeros(len(x)))]).logits[:-1].softmax(-1).max(-1).values
    thresholds = [_threshold_near(c, q) for c, q in zip(conf, QUANTILES)]
    ref = EarlyExitModel(model, thresholds).eval()(x)
    assert len(set(ref.exit.tolist())) >= 3  # several exits answer in the batch
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert fast.state_dict().keys() == model.state_dict().keys()
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = EarlyExitModel(fast, thresholds).eval()(x.contiguous(memory_format=torch.channels_last))
    # A sample on a threshold's edge could route differently under the other kernels' rounding: none is.
    margin = min(float((c - t).abs().min()) for c, t in zip(conf, thresholds))
    assert margin > ATOL
    assert torch.equal(out.exit, ref.exit)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)


@pytest.mark.timm
def test_report_times_in_channels_last_when_asked(tmp_path):
    from sd_plugin.cli import main

    model = _timm_model()
    ckpt = tmp_path / "sd.pth"
    torch.save({"arch": "test_resnet", "state_dict": model.state_dict(), "args": {"img_size": 32}}, ckpt)
    argv = ["report", str(ckpt), "--data", str(DATA), "--max-samples", "16", "--batch-size", "8", "--no-progress"]
    argv += ["--timing", "--repeats", "1", "--b1-images", "2", "--no-onnx", "--channels-last"]
    assert main([*argv, "--out-dir", str(tmp_path), "--name", "r"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["timing"]["memory_format"] == "channels_last"
    assert "channels-last memory format" in (tmp_path / "r.md").read_text()
    plain = [a for a in argv if a not in ("--timing", "--no-onnx")]
    assert main([*plain, "--out-dir", str(tmp_path), "--name", "s"]) == 1  # a memory format without timings


def test_the_report_converts_the_models_and_the_images():
    from sd_plugin.cli.report import _channels_last

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    images = _channels_last([net], torch.randn(2, 3, 8, 8))
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="needs image batches"):
        _channels_last([net], torch.randn(2, 16))
