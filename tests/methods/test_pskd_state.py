"""PS-KD's per-sample state: save/resume (bitwise), the MMPretrain Runner route, and two-rank CPU DDP."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_plugin.core import SelfDistillLoss, SelfDistillOutput
from sd_plugin.core.methods import PastPredictions

HERE = Path(__file__).resolve().parent


def _step(loss_fn, model, opt, x, y, idx):
    out = SelfDistillOutput(model(x), torch.zeros(x.shape[0], 1), [], [])
    loss = loss_fn(out, y, sample_index=idx)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def test_past_predictions_lookup_update_and_fallback():
    past = PastPredictions()
    fallback = torch.eye(3)[[0, 1, 2]]
    assert torch.equal(past.lookup(torch.tensor([5, 0, 9]), fallback), fallback)
    past.update(torch.tensor([5]), torch.tensor([[0.2, 0.3, 0.5]]))
    got = past.lookup(torch.tensor([5, 0, 9]), fallback)
    assert torch.equal(got[0], torch.tensor([0.2, 0.3, 0.5])) and torch.equal(got[1:], fallback[1:])
    with pytest.raises(ValueError, match="one data-set index per sample"):
        past.lookup(torch.tensor([1, 2]), fallback)
    with pytest.raises(ValueError, match="non-negative"):
        past.update(torch.tensor([-1]), torch.ones(1, 3))


def test_save_and_resume_continues_bitwise(tmp_path):
    """Train 4 steps; or train 2, save model + optimiser + criterion, load into fresh objects, train 2: same bits."""
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g), torch.randperm(10, generator=g)[:4])
        for _ in range(4)
    ]

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        return (
            model,
            torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
            SelfDistillLoss(exit_indices=[], pskd_alpha=0.8),
        )

    model, opt, loss_fn = fresh()
    straight = []
    for i, batch in enumerate(data):
        loss_fn.set_progress(i / 4)
        straight.append(_step(loss_fn, model, opt, *batch))
    model2, opt2, loss2 = fresh()
    resumed = []
    for i, batch in enumerate(data[:2]):
        loss2.set_progress(i / 4)
        resumed.append(_step(loss2, model2, opt2, *batch))
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "crit": loss2.state_dict()}, tmp_path / "c.pth")
    model3, opt3, loss3 = fresh()
    ckpt = torch.load(tmp_path / "c.pth", weights_only=False)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    loss3.load_state_dict(ckpt["crit"])
    assert torch.equal(loss3.past.probs, loss2.past.probs) and torch.equal(loss3.past.seen, loss2.past.seen)
    for i, batch in enumerate(data[2:], 2):
        loss3.set_progress(i / 4)
        resumed.append(_step(loss3, model3, opt3, *batch))
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert torch.equal(loss3.past.probs, loss_fn.past.probs)
    assert torch.equal(model3.weight, model.weight)


@pytest.mark.slow
def test_two_rank_cpu_ddp_keeps_one_table_and_splits_class_pairs(tmp_path):
    subprocess.run([sys.executable, str(HERE / "_ddp_pskd.py"), str(tmp_path)], check=True, timeout=600)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    p0, p1 = r0["state"]["pskd_past"], r1["state"]["pskd_past"]
    assert torch.equal(p0["probs"], p1["probs"]) and torch.equal(p0["seen"], p1["seen"])
    # Every index either rank saw is in the shared table (the union of the two halves).
    sys.path.insert(0, str(HERE))
    import _ddp_pskd

    seen = sorted({int(i) for _, _, idx in _ddp_pskd.global_batches() for i in idx})
    assert torch.nonzero(p0["seen"]).flatten().tolist() == seen
    assert torch.equal(r0["weight"], r1["weight"])
    # Class pairs: each rank gets whole same-class pairs, the two ranks different ones.
    labels = [i % 3 for i in range(11)]
    for r in (r0, r1):
        s = r["sampler"]
        assert len(s) == 6 and all(labels[a] == labels[b] for a, b in zip(s[0::2], s[1::2]))
    assert r0["sampler"][0::2] != r1["sampler"][0::2]
