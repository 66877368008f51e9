"""Machinery of ``tools/coverage_timm.py``: which architectures, at which input size, and the check of one."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

from tools._coverage_placement import placement_problem
from tools._coverage_run import BROKEN, FAIL, OK, SLOW

Size = Tuple[int, int, int]


def family(name: str) -> str:
    """The timm module that registers architecture ``name`` (e.g. 'resnet', 'vision_transformer')."""
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def num_params_meta(name: str) -> int:
    """Parameter count, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10)
    return sum(p.numel() for p in model.parameters())


def select(pattern: str, sample: int, seed: int, per_module: bool) -> Dict[str, str]:
    """Architectures to check, each with why: the seeded sample, plus (``per_module``) for every timm module the
    sample leaves out, the architecture with the fewest parameters (counted on the meta device) among the six
    whose names look smallest."""
    names = timm.list_models(pattern)
    chosen = sorted(random.Random(seed).sample(names, sample)) if 0 < sample < len(names) else list(names)
    why = {n: "sample" for n in chosen}
    if per_module:
        covered = {family(n) for n in chosen}
        for module in timm.list_modules():
            if module in covered:
                continue
            candidates = sorted(timm.list_models(pattern, module=module), key=_smallness)[:6]
            sized = []
            for n in candidates:
                try:
                    sized.append((num_params_meta(n), n))
                except Exception:  # noqa: BLE001 - cannot be built on meta: counted last
                    sized.append((1 << 62, n))
            if sized:
                why[min(sized)[1]] = "module"
    return why


_SMALL_WORDS = ("test", "atto", "femto", "pico", "nano", "xxs", "xs", "tiny", "small", "mini", "050", "s0", "b0", "18")


def _smallness(name: str) -> Tuple[int, int, str]:
    """Sort key: names with a smaller-model word (earlier in the list) first, then shorter names."""
    rank = next((i for i, w in enumerate(_SMALL_WORDS) if w in name), len(_SMALL_WORDS))
    return rank, len(name), name


def own_input_size(model: nn.Module) -> Size:
    """(C, H, W) the model was built for: ``patch_embed.img_size`` / ``img_size``, else timm's data config."""
    from timm.data import resolve_model_data_config

    c, h, w = (int(v) for v in resolve_model_data_config(model)["input_size"])
    for owner in (getattr(model, "patch_embed", None), model):
        size = getattr(owner, "img_size", None) if owner is not None else None
        if isinstance(size, int):
            return c, size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return c, int(size[0]), int(size[1])
    return c, h, w


def build(name: str, img_size: int) -> Tuple[nn.Module, Size, torch.Tensor]:
    """The model at ``img_size`` if it takes it (``img_size=`` or fully convolutional), else at its own size;
    with its plain eval output on a fixed batch of 2."""
    attempts: List[Dict[str, Any]] = [dict(img_size=img_size), {}]
    last: Optional[BaseException] = None
    for kwargs in attempts:
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=10, **kwargs).eval()
        except Exception as e:  # noqa: BLE001 - the next attempt or the report takes it
            last = e
            continue
        if getattr(model, "num_classes", 10) == 0:  # an encoder-only model: timm ignores num_classes
            raise RuntimeError("timm builds it without a classifier (num_classes=10 gives 0): not an image classifier")
        own = own_input_size(model)
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        conv_c = int(first_conv.in_channels) if first_conv is not None else own[0]  # when the data config is wrong
        small = [(c, img_size, img_size) for c in dict.fromkeys((own[0], conv_c))]
        for size in (*small, own, (conv_c, *own[1:])):
            x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
            try:
                with torch.no_grad():
                    out = model(x)
                return model, size, out
            except Exception as e:  # noqa: BLE001
                last = e
    raise RuntimeError(f"{type(last).__name__}: {last}")


def check(name: str, img_size: int, limits: Tuple[float, float, float], extend_limit: Any = None) -> Dict[str, Any]:
    """wrap, one training step (finite loss, finite non-zero gradient on every exit parameter), eval output
    identical to the plain model's, exits where they are useful (:mod:`tools._coverage_placement`), unwrap gives
    back the same model, unchanged, without hooks.

    ``limits``: (max parameters, large parameters, time limit of a large model): models over the first are not
    tried; over the second, ``extend_limit`` raises this check's time limit."""
    import warnings

    import sd_plugin

    warnings.filterwarnings("ignore")
    max_params, large_params, large_timeout = limits
    try:
        n = num_params_meta(name)
    except Exception as e:  # noqa: BLE001
        return dict(status=BROKEN, error=f"timm cannot build it on meta: {e}"[:300])
    if n > max_params:
        return dict(status=SLOW, error=f"{n / 1e6:.0f} M parameters > --max-params", params_m=round(n / 1e6, 2))
    if n > large_params and extend_limit is not None:
        extend_limit(large_timeout)
    try:
        model, size, before = build(name, img_size)
    except Exception as e:  # noqa: BLE001
        return dict(status=BROKEN, error=f"timm model without sd_plugin: {e}"[:400])
    result: Dict[str, Any] = dict(input_size=list(size), params_m=round(n / 1e6, 2))
    try:
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
        keys_before = list(model.state_dict())
        buffers_before = {k: v.clone() for k, v in model.named_buffers()}  # the training step moves BN statistics
        own = {id(p) for p in model.parameters()}
        hooks_before = _hook_count(model)
        sd_model = sd_plugin.wrap(model, input_size=size).train()
        exit_params = [(n, p) for n, p in sd_model.named_parameters() if id(p) not in own]
        result.update(num_exits=sd_model.num_exits, exits=[f"{p.module}:{p.fmt}" for p in sd_model.exit_points])
        if not exit_params:
            return dict(result, status=FAIL, error="no exit parameters")
        out = sd_model(x)
        loss = sd_plugin.SelfDistillLoss()(out, torch.tensor([1, 2]))
        if not torch.isfinite(loss):
            return dict(result, status=FAIL, error=f"loss is {loss.item()}")
        loss.backward()
        dead = [n for n, p in exit_params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
        if dead:
            return dict(
                result, status=FAIL, error=f"{len(dead)} exit parameters without a finite non-zero gradient: {dead[:3]}"
            )
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers_before:
                    v.copy_(buffers_before[k])
        sd_model.eval()
        with torch.no_grad():
            if not torch.equal(sd_model(x), before):
                return dict(result, status=FAIL, error="eval output differs from the plain model")
            problem = placement_problem(sd_model, x)
            if problem:
                return dict(result, status=FAIL, error=f"misplaced exits: {problem}")
            plain = sd_plugin.unwrap(sd_model)
            if plain is not model or list(plain.state_dict()) != keys_before:
                return dict(result, status=FAIL, error="unwrap did not give back the same model with the same keys")
            if _hook_count(plain) != hooks_before:
                return dict(result, status=FAIL, error="hooks left on the unwrapped model")
            if not torch.equal(plain(x), before):
                return dict(result, status=FAIL, error="the unwrapped model's output differs from the plain model")
        return dict(result, status=OK)
    except Exception as e:  # noqa: BLE001
        return dict(result, status=FAIL, error=f"{type(e).__name__}: {e}"[:400])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
