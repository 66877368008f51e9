"""``CPUAutocastOptimWrapper``: mmengine's OptimWrapper plus CPU bfloat16 autocast (AmpOptimWrapper needs a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.mmpretrain


def _wrapper(**kwargs):
    from sd_plugin._amp import CPUAutocastOptimWrapper

    model = nn.Linear(4, 3)
    return model, CPUAutocastOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kwargs)


def test_forward_runs_under_bfloat16_autocast_and_updates_in_float32():
    model, wrapper = _wrapper()
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        out = model(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    before = model.weight.detach().clone()
    wrapper.update_params(out.float().pow(2).mean())
    assert model.weight.dtype == torch.float32 and not torch.equal(before, model.weight)


def test_accepts_the_amp_options_and_state_of_amp_optim_wrapper():
    """``--amp`` adds loss_scale; a checkpoint written on a GPU holds a GradScaler state: both are ignored."""
    model, wrapper = _wrapper(loss_scale="dynamic", dtype="bfloat16")
    state = wrapper.state_dict()
    state["loss_scaler"] = {"scale": 65536.0, "_growth_tracker": 0}
    wrapper.load_state_dict(state)
    assert "loss_scaler" in state  # the caller's dict is left as it was


@pytest.mark.parametrize("dtype", ["float16", torch.float16, "float32"])
def test_other_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match=r"dtype='bfloat16' only.*needs a GPU"):
        _wrapper(dtype=dtype)
