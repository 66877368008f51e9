"""The check of one MMPretrain model dict for ``tools/coverage_mmpretrain.py`` (run in a forked child).

The self-distillation model is built with the two lines (``type='SelfDistillClassifier'``, sd_plugin imported);
the plain ``ImageClassifier`` gets exactly its weights (built on the meta device, then every parameter and buffer
copied by name; on CPU where a backbone cannot be built on meta). Then, on one batch from the config's own data
preprocessor (Mixup/CutMix included) and the same random state: the deepest classifier's loss must equal the plain
model's; every exit parameter must get a finite non-zero gradient; after an SGD step and copying the weights over
(``load_state_dict(strict=True)``: same keys), ``predict`` must give identical scores; and the exits must sit
somewhere useful (:mod:`tools._coverage_placement`).
"""

from __future__ import annotations

import copy
import inspect
import random
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from tools._coverage_placement import placement_problem
from tools._coverage_run import BROKEN, FAIL, OK, SLOW

Size = Tuple[int, int]


def _build(cfg: Dict[str, Any], device: str = "cpu") -> nn.Module:
    from mmpretrain.registry import MODELS

    with torch.device(device):
        return MODELS.build(copy.deepcopy(cfg))


def _plain_like(sd: nn.Module, plain_cfg: Dict[str, Any], device: str) -> nn.Module:
    """The plain ImageClassifier with every parameter and buffer of ``sd`` (same names), copied."""
    plain = _build(plain_cfg, device)
    if device == "meta":
        plain = plain.to_empty(device="cpu")
    _copy_weights(plain, sd)
    return plain


def _copy_weights(plain: nn.Module, sd: nn.Module) -> None:
    """Copy every parameter and buffer of ``plain`` from ``sd`` by name. Not ``load_state_dict``: some backbones
    drop their own buffers from a state dict while loading it (SwinV2's coordinate tables), so a strict load of a
    model's own state fails for them."""
    src = dict(sd.named_parameters())
    src.update(sd.named_buffers())
    with torch.no_grad():
        for name, t in [*plain.named_parameters(), *plain.named_buffers()]:
            if name not in src or src[name].shape != t.shape:
                raise KeyError(f"{name} is not in the SelfDistillClassifier with the same shape")
            t.copy_(src[name])


def _at_size(model: Dict[str, Any], size: Size, own: Size) -> Dict[str, Any]:
    """The model dict for inputs of ``size``: backbones that take ``img_size`` get it (others take any size)."""
    from mmpretrain.registry import MODELS

    if size == own:
        return model
    backbone = dict(model["backbone"])
    cls = MODELS.get(backbone.get("type"))
    if isinstance(cls, type) and "img_size" in inspect.signature(cls.__init__).parameters:
        backbone["img_size"] = size[0] if size[0] == size[1] else size
    return dict(model, backbone=backbone)


def _sizes(own: Size, small: int) -> List[Size]:
    """``small``, then twice that, then the config's own size: tried in turn until the plain model runs."""
    return [(s, s) for s in (small, 2 * small) if small and s < min(own)] + [own]


def _seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batch(model: Any, size: Size, training: bool, seed: int) -> Tuple[torch.Tensor, List[Any]]:
    """Two random images through the model's data preprocessor (batch augments when ``training``)."""
    from mmpretrain.structures import DataSample

    num_classes = int(getattr(model.head, "num_classes", 2) or 2)
    mean = getattr(model.data_preprocessor, "mean", None)
    channels = int(mean.shape[0]) if isinstance(mean, torch.Tensor) and mean.dim() == 3 else 3  # LeNet: 1
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, (channels, *size), generator=g, dtype=torch.uint8) for _ in range(2)]
    samples = [DataSample().set_gt_label(i % num_classes) for i in range(2)]
    _seed(seed)
    data = model.data_preprocessor({"inputs": imgs, "data_samples": samples}, training)
    return data["inputs"], data["data_samples"]


def _loss_sum(losses: Dict[str, Any], deepest_only: bool) -> torch.Tensor:
    """Sum of the loss terms as mmengine adds them up; ``deepest_only`` leaves out the ``exit*`` terms."""
    total = torch.zeros(())
    for k, v in losses.items():
        if "loss" not in k or (deepest_only and k.startswith("exit")):
            continue
        for t in v if isinstance(v, (list, tuple)) else [v]:
            total = total + t.mean()
    return total


def _plain_loss(plain: nn.Module, inputs: torch.Tensor, samples: List[Any]) -> torch.Tensor:
    plain.train()
    _seed(1)
    with torch.no_grad():
        return _loss_sum(plain(inputs, copy.deepcopy(samples), mode="loss"), False)


def _quiet() -> None:
    """mmengine's init logs and library warnings would bury the tool's own output."""
    import logging
    import warnings

    from mmengine.logging import MMLogger

    warnings.filterwarnings("ignore")
    MMLogger.get_current_instance().setLevel(logging.ERROR)


def check_config(model: Dict[str, Any], own: Size, small: int, max_params: float) -> Dict[str, Any]:
    """The check (module docstring), at the config's own input size (``small`` = 0) or at the first of
    ``small``, ``2 * small``, own that the plain model takes."""
    import sd_plugin  # noqa: F401 - the first of the two lines: registers SelfDistillClassifier

    _quiet()
    too_big = dict(status=SLOW, error="over --max-params (two copies of the model and its gradients)")
    try:
        n = sum(p.numel() for p in _build(dict(model, type="ImageClassifier"), "meta").parameters())
    except Exception:  # noqa: BLE001 - some backbones cannot be built on meta: counted on CPU below
        n = 0
    if n > max_params:
        return dict(too_big, params_m=round(n / 1e6, 2))
    errors: List[str] = []
    sizes = _sizes(own, small)
    for size in sizes:
        plain_cfg = dict(_at_size(model, size, own), type="ImageClassifier")
        sd_cfg = dict(plain_cfg, type="SelfDistillClassifier")  # the second line
        try:
            _seed(0)
            sd = _build(sd_cfg)
        except Exception as e:  # noqa: BLE001 - sd_plugin's fault unless the plain model fails too
            try:
                plain = _build(plain_cfg)
                inputs, samples = _batch(plain, size, True, 0)
                _plain_loss(plain, inputs, samples)
            except Exception as plain_error:  # noqa: BLE001
                errors.append(f"at {size[0]}x{size[1]}: {type(plain_error).__name__}: {plain_error}"[:300])
                continue
            return dict(status=FAIL, size=list(size), error=f"{type(e).__name__}: {e}"[:400])
        if sum(p.numel() for p in sd.parameters()) > max_params:
            return too_big
        inputs, samples = _batch(sd, size, True, 0)
        try:
            try:
                plain = _plain_like(sd, plain_cfg, "meta")
                plain_loss = _plain_loss(plain, inputs, samples)
            except Exception as e:  # noqa: BLE001 - not buildable on meta (or a tensor left there): on CPU
                if "meta" not in str(e) and not isinstance(e, (KeyError, NotImplementedError)):
                    raise
                plain = _plain_like(sd, plain_cfg, "cpu")
                plain_loss = _plain_loss(plain, inputs, samples)
        except Exception as e:  # noqa: BLE001 - the next size, or the report
            errors.append(f"at {size[0]}x{size[1]}: {type(e).__name__}: {e}"[:300])
            continue
        result: Dict[str, Any] = dict(
            params_m=round(sum(p.numel() for p in plain.parameters()) / 1e6, 2), size=list(size), own_size=list(own)
        )
        if errors:
            result["smaller_sizes_failed"] = errors
        try:
            result.update(_compare(sd, plain, inputs, samples, plain_loss, size))
        except Exception as e:  # noqa: BLE001
            return dict(result, status=FAIL, error=f"{type(e).__name__}: {e}"[:400])
        if result["status"] == BROKEN and size != sizes[-1]:  # e.g. NaN scores of a deep net on small maps
            errors.append(f"at {size[0]}x{size[1]}: {result['error']}")
            del sd, plain
            continue
        return result
    return dict(status=BROKEN, error=f"plain ImageClassifier {errors[-1]}"[:400], errors=errors)


def _compare(
    sd: nn.Module, plain: nn.Module, inputs: torch.Tensor, samples: List[Any], plain_loss: torch.Tensor, size: Size
) -> Dict[str, Any]:
    plain_names = {k for k, _ in plain.named_parameters()}
    exit_params = [(k, p) for k, p in sd.named_parameters() if k not in plain_names and p.requires_grad]
    points = getattr(sd, "exit_points", None) or []
    out: Dict[str, Any] = dict(
        num_exits=getattr(sd, "num_exits", None),
        exits=[f"{getattr(p, 'module', p)}:{getattr(p, 'fmt', '')}" for p in points],
    )
    if not exit_params:
        return dict(out, status=FAIL, error="no exit parameters")
    sd.train()
    _seed(1)
    losses = sd(inputs, copy.deepcopy(samples), mode="loss")
    deepest = _loss_sum(losses, True)
    out.update(plain_loss=plain_loss.item(), deepest_loss=deepest.item(), loss_exact=bool(deepest == plain_loss))
    total = _loss_sum(losses, False)
    if not torch.isfinite(total):
        return dict(out, status=FAIL, error=f"total loss is {total.item()}")
    total.backward()
    dead = [k for k, p in exit_params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    if dead:
        return dict(
            out, status=FAIL, error=f"{len(dead)} exit parameters without a finite non-zero gradient: {dead[:3]}"
        )
    if not torch.allclose(deepest, plain_loss, rtol=1e-6, atol=0.0):
        return dict(out, status=FAIL, error=f"deepest loss {deepest.item()!r} != plain loss {plain_loss.item()!r}")
    torch.optim.SGD([p for p in sd.parameters() if p.requires_grad], lr=1e-3).step()
    _copy_weights(plain, sd)
    sd.eval()
    plain.eval()
    x, s = _batch(plain, size, False, 2)
    with torch.no_grad():
        got = torch.stack([d.pred_score for d in sd(x, copy.deepcopy(s), mode="predict")])
        want = torch.stack([d.pred_score for d in plain(x, copy.deepcopy(s), mode="predict")])
    if not torch.isfinite(want).all():
        return dict(out, status=BROKEN, error=f"the plain model predicts non-finite scores at {size[0]}x{size[1]}")
    if got.shape != want.shape or not torch.equal(got, want):
        diff = (got - want).abs().max().item() if got.shape == want.shape else f"shapes {got.shape} {want.shape}"
        return dict(out, status=FAIL, error=f"predict differs from the plain model (max |diff| {diff})")
    problem = placement_problem(sd, x)
    if problem:
        return dict(out, status=FAIL, error=f"misplaced exits: {problem}")
    return dict(out, status=OK)
