"""Under autocast the KL and hint terms of the core loss are computed in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd_plugin.core import SelfDistillConfig, SelfDistillLoss, SelfDistillOutput, feature_hint, kd_kl_div


def _bf16_pair(seed: int = 0, n: int = 8, c: int = 100, scale: float = 8.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * scale).bfloat16()
    t = (torch.randn(n, c, generator=g) * scale).bfloat16()
    return s, t


def _kd_reference(s: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    log_p_s = F.log_softmax(s.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(t.to(dtype) / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def test_kd_under_cpu_autocast_is_float32():
    s, t = _bf16_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kd = kd_kl_div(s, t, 3.0)
    assert kd.dtype == torch.float32
    exact = _kd_reference(s, t, 3.0, torch.float64)
    assert kd.double().item() == pytest.approx(exact.item(), rel=1e-5)
    # The same maths in bfloat16 is far off: the float32 cast in core is what makes the test pass.
    in_bf16 = _kd_reference(s, t, 3.0, torch.bfloat16)
    assert abs(in_bf16.double().item() - exact.item()) > 1e-3 * abs(exact.item())


def test_hint_under_cpu_autocast_is_float32():
    s, t = _bf16_pair(seed=1, c=512, scale=1.0)
    s = s + 300  # large features: a bfloat16 sum of squares would be off by ~1e-2
    t = t + 300
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hint = feature_hint(s, t, "mean")
    assert hint.dtype == torch.float32
    exact = torch.linalg.vector_norm(s.double() - t.double(), dim=1).mean()
    assert hint.double().item() == pytest.approx(exact.item(), rel=1e-5)


def test_all_terms_float32_and_finite_with_bfloat16_outputs():
    g = torch.Generator().manual_seed(2)
    out = SelfDistillOutput(
        logits=(torch.randn(4, 10, generator=g) * 50).bfloat16(),
        features=torch.randn(4, 16, generator=g).bfloat16(),
        exit_logits=[(torch.randn(4, 10, generator=g) * 50).bfloat16() for _ in range(2)],
        exit_features=[torch.randn(4, 16, generator=g).bfloat16() for _ in range(2)],
    )
    criterion = SelfDistillLoss(SelfDistillConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = criterion(out, torch.tensor([0, 1, 2, 3]))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert {v.dtype for v in criterion.last_terms.values()} == {torch.float32}
    assert len(criterion.last_terms) == 1 + 3 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast needs a GPU")
def test_kd_under_cuda_float16_autocast_is_float32():
    s, t = (x.float().cuda() * 20 for x in _bf16_pair(seed=3))
    with torch.autocast("cuda", dtype=torch.float16):
        kd = kd_kl_div(s.half(), t.half(), 3.0)
    assert kd.dtype == torch.float32 and torch.isfinite(kd)
