"""Shared helpers of the MMPretrain adapter tests: load a packaged config, shrink it, check one step."""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

import sd_plugin  # noqa: F401  (registers the MMPretrain components)

MMPRETRAIN_CONFIGS = os.path.join(os.path.dirname(__import__("mmpretrain").__file__), ".mim", "configs")
NUM_CLASSES = 5


def packaged(rel: str) -> str:
    return os.path.join(MMPRETRAIN_CONFIGS, rel)


def _set(d: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def load_model_cfg(rel: str, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The packaged config's model dict, with the two lines' effect and the test's shrinking overrides."""
    from mmengine import Config

    cfg = Config.fromfile(packaged(rel))
    model = copy.deepcopy(cfg.model.to_dict())
    for key, value in (overrides or {}).items():
        _set(model, key, value)
    model["head"]["num_classes"] = NUM_CLASSES
    model["head"].pop("init_cfg", None)
    dp = model.get("data_preprocessor") or cfg.get("data_preprocessor")
    if dp is not None:
        dp = dict(dp)
        dp["num_classes"] = NUM_CLASSES
        model["data_preprocessor"] = dp
    model.pop("init_cfg", None)
    model["backbone"].pop("init_cfg", None)
    return model


def batch(model: torch.nn.Module, size: int, n: int = 2, seed: int = 0) -> Tuple[torch.Tensor, List[Any]]:
    """A preprocessed training batch (Mixup/CutMix of the config applied) of ``n`` random images."""
    from mmpretrain.structures import DataSample

    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]
    samples = [DataSample().set_gt_label(i % NUM_CLASSES) for i in range(n)]
    data = model.data_preprocessor({"inputs": imgs, "data_samples": samples}, True)
    return data["inputs"], data["data_samples"]


def build_pair(model_cfg: Dict[str, Any], **options: Any) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(SelfDistillClassifier, plain ImageClassifier with the same backbone/neck/head weights)."""
    from mmpretrain.registry import MODELS

    sd_cfg = dict(copy.deepcopy(model_cfg), type="SelfDistillClassifier", **options)
    plain_cfg = dict(copy.deepcopy(model_cfg), type="ImageClassifier")
    torch.manual_seed(0)
    sd = MODELS.build(sd_cfg)
    plain = MODELS.build(plain_cfg)
    state = {k: v for k, v in sd.state_dict().items() if not k.startswith(("exit_necks.", "exit_heads."))}
    plain.load_state_dict(state, strict=True)
    return sd, plain


def exit_param_grads(sd: torch.nn.Module) -> Dict[str, float]:
    """Sum of |grad| of every exit parameter (None -> -1)."""
    out = {}
    for prefix in ("exit_necks", "exit_heads"):
        for name, p in getattr(sd, prefix).named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{name}"] = -1.0 if p.grad is None else float(p.grad.abs().sum())
    return out


def backward_reaches_every_exit(sd: torch.nn.Module, losses: Dict[str, torch.Tensor]) -> None:
    """Backward the sum of ``losses``: finite, and every exit parameter gets a finite non-zero gradient."""
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()  # type: ignore[union-attr]
    grads = exit_param_grads(sd)
    assert grads and all(0 < g < float("inf") for g in grads.values()), {k: g for k, g in grads.items() if g <= 0}


def predict_like_plain(sd: torch.nn.Module, plain: torch.nn.Module, inputs: torch.Tensor) -> None:
    """After copying sd's weights into plain: ``predict`` gives the same scores and labels, exactly."""
    sd.eval()
    plain.eval()
    plain.load_state_dict({k: v for k, v in sd.state_dict().items() if not k.startswith("exit_")}, strict=True)
    with torch.no_grad():
        want = plain(inputs, mode="predict")
        got = sd(inputs, mode="predict")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.pred_score, b.pred_score, rtol=0, atol=0)
        assert torch.equal(a.pred_label, b.pred_label)
