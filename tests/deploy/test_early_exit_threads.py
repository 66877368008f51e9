"""One EarlyExitModel serves many threads: exactly the sequential answers, and no hook is left behind."""

import threading

import pytest
import torch

timm = pytest.importorskip("timm")
from deploy_toy import wrapped_test_resnet  # noqa: E402

from sd_plugin.deploy import EarlyExitModel, collect_exit_logits  # noqa: E402

pytestmark = pytest.mark.timm


def _model():
    return wrapped_test_resnet()


def _hook_counts(model):
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
    }


@torch.no_grad()
def test_four_threads_get_the_sequential_answers_and_no_hook_remains():
    model = _model()
    before = _hook_counts(model)
    torch.manual_seed(1)
    inputs = [torch.randn(4, 3, 32, 32) for _ in range(24)]
    ref = collect_exit_logits(model, [(x, torch.zeros(4)) for x in inputs]).logits
    conf = ref[:-1].softmax(-1).max(-1).values
    ee = EarlyExitModel(model, [float(c.quantile(q)) for c, q in zip(conf, (0.7, 0.6, 0.5))]).eval()
    sequential = [ee(x) for x in inputs]
    assert len({int(e) for o in sequential for e in o.exit}) >= 3  # the batches mix several exits
    results: dict = {}
    errors: list = []
    barrier = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                for i in range(t, len(inputs), 4):
                    results.setdefault(i, []).append(ee(inputs[i]))
        except Exception as e:  # reported below with the thread that raised
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for i, want in enumerate(sequential):
        assert len(results[i]) == 3
        for got in results[i]:
            assert torch.equal(got.exit, want.exit)
            assert torch.equal(got.logits, want.logits)
            assert got.samples_per_stage == want.samples_per_stage
    assert _hook_counts(model) == before


@torch.no_grad()
def test_no_hook_or_state_remains_after_an_exception():
    model = _model()
    before = _hook_counts(model)
    x = torch.randn(4, 3, 32, 32)
    ee = EarlyExitModel(model, [None, None, 0.0]).eval()
    want = ee(x)
    assert want.exit.tolist() == [3] * 4
    real = model.forward_exit

    def broken(k, feature):
        raise RuntimeError("exit failed")

    model.forward_exit = broken
    try:
        with pytest.raises(RuntimeError, match="exit failed"):
            ee(x)
    finally:
        del model.forward_exit
    assert model.forward_exit == real
    assert _hook_counts(model) == before
    got = ee(x)  # the failed call left no session behind: the next one is answered as before
    assert torch.equal(got.logits, want.logits) and torch.equal(got.exit, want.exit)
    torch.testing.assert_close(model(x), model.forward_deepest(x))
