"""How much of timm ``sd_plugin.wrap`` handles: wrap + one training step per architecture, measured.

A seeded sample of timm's registry plus the smallest architecture of each timm module it leaves out, each checked in a
forked child with a time limit against the plain model (random init, nothing downloads). See docs/coverage.md.

    python -m tools.coverage_timm --filter 'resnet*' --no-per-module --output work_dirs/coverage_resnet.json
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

from tools._coverage import BROKEN, OK, SLOW, parser, placement_problem, previous, require, sweep, verdict

Size = Tuple[int, int, int]

#: Words of small models, smallest first: per left-out module, the six names that look smallest are sized.
SMALL_WORDS = ("test", "atto", "femto", "pico", "nano", "xxs", "xs", "tiny", "small", "mini", "050", "s0", "b0", "18")


def family(name: str) -> str:
    """The timm module that registers architecture ``name`` (e.g. 'resnet', 'vision_transformer')."""
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def num_params_meta(name: str, fallback: Optional[int] = None) -> int:
    """Parameter count, built on the meta device (no memory, no init); ``fallback`` if given when it cannot be."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
    except Exception:
        if fallback is None:
            raise
        return fallback


def select(pattern: str, sample: int, seed: int, per_module: bool) -> Dict[str, str]:
    """Architectures to check, each with why: the seeded sample, plus (``per_module``) for every timm module the
    sample leaves out, the one with the fewest parameters among the six whose names look smallest."""
    names = timm.list_models(pattern)
    chosen = sorted(random.Random(seed).sample(names, sample)) if 0 < sample < len(names) else list(names)
    why = {n: "sample" for n in chosen}
    covered = {family(n) for n in chosen}
    for module in [m for m in timm.list_modules() if per_module and m not in covered]:
        smallest = sorted(timm.list_models(pattern, module=module), key=_smallness)[:6]
        if smallest:
            why[min((num_params_meta(n, 1 << 62), n) for n in smallest)[1]] = "module"  # unbuildable on meta: last
    return why


def _smallness(name: str) -> Tuple[int, int, str]:
    return next((i for i, w in enumerate(SMALL_WORDS) if w in name), len(SMALL_WORDS)), len(name), name


def own_input_size(model: nn.Module) -> Size:
    """(C, H, W) the model was built for: ``patch_embed.img_size`` / ``img_size``, else timm's data config."""
    from timm.data import resolve_model_data_config

    c, h, w = (int(v) for v in resolve_model_data_config(model)["input_size"])
    for size in (getattr(getattr(model, "patch_embed", None), "img_size", None), getattr(model, "img_size", None)):
        if isinstance(size, int):
            return c, size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return c, int(size[0]), int(size[1])
    return c, h, w


def build(name: str, img_size: int) -> Tuple[nn.Module, Size, torch.Tensor]:
    """The model at ``img_size`` if it takes it (``img_size=`` or fully convolutional), else at its own size;
    with its plain eval output on a fixed batch of 2."""
    last: Optional[BaseException] = None
    attempts: Tuple[Dict[str, Any], ...] = (dict(img_size=img_size), {})
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
        for size in (*[(c, img_size, img_size) for c in dict.fromkeys((own[0], conv_c))], own, (conv_c, *own[1:])):
            try:
                with torch.no_grad():
                    return model, size, model(torch.randn(2, *size, generator=torch.Generator().manual_seed(1)))
            except Exception as e:  # noqa: BLE001
                last = e
    raise RuntimeError(f"{type(last).__name__}: {last}")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def check(name: str, img_size: int, limits: Tuple[float, float, float], extend_limit: Any = None) -> Dict[str, Any]:
    """The check (docs/coverage.md). ``limits``: (max parameters, large parameters, time limit of a large
    model): models over the first are not tried; over the second, ``extend_limit`` raises this check's limit."""
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
        keys, hooks = list(model.state_dict()), _hooks(model)
        buffers = {k: v.clone() for k, v in model.named_buffers()}  # the training step moves BN statistics
        own = {id(p) for p in model.parameters()}
        sd_model = sd_plugin.wrap(model, input_size=size).train()
        exit_params = [(n, p) for n, p in sd_model.named_parameters() if id(p) not in own]
        result.update(num_exits=sd_model.num_exits, exits=[f"{p.module}:{p.fmt}" for p in sd_model.exit_points])
        require(exit_params, "no exit parameters")
        loss = sd_plugin.SelfDistillLoss()(sd_model(x), torch.tensor([1, 2]))
        require(torch.isfinite(loss), f"loss is {loss.item()}")
        loss.backward()
        dead = [n for n, p in exit_params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
        require(not dead, f"{len(dead)} exit parameters without a finite non-zero gradient: {dead[:3]}")
        sd_model.eval()
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers.get(k, v))
            require(torch.equal(sd_model(x), before), "eval output differs from the plain model")
            problem = placement_problem(sd_model, x)
            require(not problem, f"misplaced exits: {problem}")
            plain = sd_plugin.unwrap(sd_model)
            same = plain is model and list(plain.state_dict()) == keys
            require(same, "unwrap did not give back the same model with the same keys")
            require(_hooks(plain) == hooks, "hooks left on the unwrapped model")
            require(torch.equal(plain(x), before), "the unwrapped model's output differs from the plain model")
        return dict(result, status=OK)
    except Exception as e:  # noqa: BLE001
        return dict(result, **verdict(e))


def main(argv: Optional[List[str]] = None) -> int:
    p = parser(__doc__, timeout=120.0, max_params=700e6, name="timm")
    p.add_argument("--filter", default="*", help="timm.list_models glob (default: all)")
    p.add_argument("--sample", type=int, default=0, help="random sample of this many architectures (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--no-per-module", dest="per_module", action="store_false", help="no smallest per left-out module")
    p.add_argument("--img-size", type=int, default=64, help="input size for models that take any size")
    p.add_argument("--large-params", type=float, default=150e6, help="models above this get --large-timeout")
    p.add_argument("--large-timeout", type=float, default=900.0, help="seconds per large model (default 900)")
    args = p.parse_args(argv)
    chosen, results = select(args.filter, args.sample, args.seed, args.per_module), previous(args)
    todo = [n for n in chosen if n not in results or results[n]["status"] == args.retry]
    print(f"{len(chosen)} architectures ({sum(v == 'module' for v in chosen.values())} per module), {len(todo)} to run")

    def store(name: str, r: Dict[str, Any]) -> str:
        results[name] = dict(r, selected=chosen[name])
        return f"{name:50s}"

    limits = (args.max_params, args.large_params, args.large_timeout)
    info = dict(timm=timm.__version__, registry_size=len(timm.list_models()), modules=len(timm.list_modules()))
    tasks = [(n, (n, args.img_size, limits), args.timeout) for n in todo]
    sweep(args, results, tasks, check, store, family, "timm module", lambda: info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
