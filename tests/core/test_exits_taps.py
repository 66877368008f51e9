import pytest
import torch
import torch.nn as nn

from sd_plugin.core import ExitPoint, FeatureTaps, build_exit, default_block_exits


@pytest.mark.parametrize(
    "fmt, shape, stride",
    [
        ("NCHW", (2, 16, 16, 16), 4),
        ("NCHW", (2, 16, 7, 7), 1),
        ("NHWC", (2, 8, 8, 16), 2),
        ("NLC", (2, 50, 16), 1),
        ("NC", (2, 16), 1),
    ],
)
def test_exit_gives_deepest_width(fmt, shape, stride):
    exit_ = build_exit(fmt, in_channels=16, out_features=32, stride=stride)
    out = exit_(torch.randn(*shape))
    assert out.shape == (2, 32)
    out.sum().backward()
    assert all(p.grad is not None for p in exit_.parameters())


def test_conv_exit_accepts_map_smaller_than_stride():
    exit_ = build_exit("NCHW", 8, 16, stride=8)
    assert exit_(torch.randn(2, 8, 4, 4)).shape == (2, 16)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        build_exit("NDHWC", 4, 4)


def test_taps_record_without_changing_output():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    ref = model(x)
    points = [ExitPoint("0", "NC", 8), ExitPoint("2", "NC", 3, hook="forward_pre")]
    with FeatureTaps(model, points) as taps:
        out = model(x)
    assert torch.equal(out, ref)
    assert torch.equal(taps.features[0], model[0](x))
    assert torch.equal(taps.features[1], torch.relu(model[0](x)))
    assert not model[0]._forward_hooks and not model[2]._forward_pre_hooks


def test_taps_name_missing_module():
    model = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(ValueError, match="no submodule 'head'"), FeatureTaps(model, [ExitPoint("head", "NC", 8)]):
        pass


def test_default_block_exits():
    assert default_block_exits(12) == (2, 5, 8)
    assert default_block_exits(4) == (0, 1, 2)
    assert all(i < 7 for i in default_block_exits(8))
