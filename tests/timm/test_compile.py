"""``torch.compile(sd_model)``: trains, with at most one graph break per step, and evaluates as eager (slow)."""

from __future__ import annotations

import copy
from typing import Tuple

import pytest
import torch

timm = pytest.importorskip("timm")

import sd_plugin  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.slow]

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 3, 7, 9])


def _models(**options: object) -> Tuple[sd_plugin.SelfDistillModel, sd_plugin.SelfDistillModel]:
    torch.manual_seed(0)
    sd_model = sd_plugin.wrap(timm.create_model("test_resnet", num_classes=10), input_size=(3, 32, 32), **options)
    return sd_model, copy.deepcopy(sd_model)


def test_graph_breaks_per_step() -> None:
    torch._dynamo.reset()
    sd_model, _ = _models()
    sd_model.train()
    train = torch._dynamo.explain(sd_model)(X)
    # one break: the finite-input check (a data-dependent bool) before the forward; none in the exits' taps
    assert train.graph_break_count == 1 and train.graph_count == 2
    assert "_checks.py" in train.break_reasons[0].user_stack[-1].filename
    sd_model.eval()
    assert torch._dynamo.explain(sd_model)(X).graph_break_count == 0


def test_compiled_training_matches_eager() -> None:
    """Two SGD steps through ``torch.compile`` (aot_eager: dynamo + AOT autograd, no C++ build) equal eager's."""
    torch._dynamo.reset()
    sd_model, reference = _models()
    compiled = torch.compile(sd_model, backend="aot_eager")
    criterion = sd_plugin.SelfDistillLoss()
    for net, params in ((compiled, sd_model.parameters()), (reference, reference.parameters())):
        net.train()
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            criterion(net(X), Y).backward()
            opt.step()
    for n, p in sd_model.named_parameters():
        torch.testing.assert_close(p, reference.get_parameter(n), rtol=1e-5, atol=1e-6, msg=n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sd_model.sd_exits.parameters())


def test_compiled_eval_equals_eager_inductor() -> None:
    """The default backend (inductor, C++ on CPU), on the ensemble (the timm model and every exit): the same
    outputs as eager, to float32 rounding."""
    torch._dynamo.reset()
    sd_model, reference = _models(predict_exit="ensemble")
    compiled = torch.compile(sd_model.eval())
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), reference(X), rtol=1e-5, atol=1e-5)
