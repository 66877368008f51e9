"""How much of timm ``sd_plugin.wrap`` handles: wrap + one training step per architecture.

Every architecture is built (random init, nothing downloads) at a small input size in a forked subprocess
with a time limit, wrapped, trained for one step (every exit parameter must get a non-zero gradient) and
checked in eval mode against the plain model (exact equality). Prints the fraction that works, overall and
per family (the timm module that defines the architecture), and writes every result to a JSON file.

Examples:
    python tools/coverage_timm.py --filter 'resnet*' --output work_dirs/coverage_resnet.json
    python tools/coverage_timm.py --sample 300 --seed 0 --timeout 60 --output work_dirs/coverage_timm.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

import sd_plugin
from sd_plugin.timm_adapter._discovery import default_input_size

OK, FAIL, SLOW, BROKEN = "ok", "fail", "skipped: too slow", "skipped: model fails on its own"


def family(name: str) -> str:
    """The timm module that defines architecture ``name`` (e.g. 'resnet', 'vision_transformer')."""
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def num_params_meta(name: str) -> int:
    """Parameter count, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10)
    return sum(p.numel() for p in model.parameters())


def build(name: str, img_size: int) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """The model at ``img_size`` if it takes it (``img_size=`` kwarg or a fully convolutional net), else its own."""
    attempts: List[Dict[str, Any]] = [dict(img_size=img_size), {}]
    last: Optional[BaseException] = None
    for kwargs in attempts:
        try:
            model = timm.create_model(name, num_classes=10, **kwargs).eval()
        except Exception as e:  # noqa: BLE001 - the next attempt or the report takes it
            last = e
            continue
        own = default_input_size(model)
        for size in ((own[0], img_size, img_size), own):
            try:
                with torch.no_grad():
                    model(torch.randn(2, *size))
                return model, size
            except Exception as e:  # noqa: BLE001
                last = e
    raise RuntimeError(f"{type(last).__name__}: {last}")


def check(name: str, img_size: int) -> Dict[str, Any]:
    """Wrap, one SGD step, eval equality with the plain model."""
    torch.manual_seed(0)
    try:
        model, size = build(name, img_size)
    except Exception as e:  # noqa: BLE001
        return dict(status=BROKEN, error=str(e)[:300])
    try:
        sd_model = sd_plugin.wrap(model, input_size=size).train()
        x = torch.randn(2, *size)
        out = sd_model(x)
        loss = sd_plugin.SelfDistillLoss()(out, torch.tensor([1, 2]))
        loss.backward()
        dead = [n for n, p in sd_model.sd_exits.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        if dead:
            return dict(status=FAIL, error=f"exit parameters without gradient: {dead[:4]}")
        if not torch.isfinite(loss):
            return dict(status=FAIL, error=f"loss is {loss.item()}")
        sd_model.eval()
        with torch.no_grad():
            same = torch.equal(sd_model(x), model(x))
        if not same:
            return dict(status=FAIL, error="eval output differs from the plain model")
        return dict(
            status=OK,
            input_size=list(size),
            kind=sd_model.kind,
            exits=[f"{p.module}:{p.fmt}" for p in sd_model.exit_points],
        )
    except Exception as e:  # noqa: BLE001
        return dict(status=FAIL, error=f"{type(e).__name__}: {str(e)[:300]}")


def _child(name: str, img_size: int, queue: Any) -> None:
    torch.set_num_threads(1)
    queue.put(check(name, img_size))


def run_one(name: str, img_size: int, timeout: float, max_params: float) -> Dict[str, Any]:
    t0 = time.time()
    try:
        n_params = num_params_meta(name)
    except Exception as e:  # noqa: BLE001
        return dict(status=BROKEN, error=f"cannot build on meta: {e}"[:300], seconds=0.0)
    if n_params > max_params:
        return dict(status=SLOW, error=f"{n_params / 1e6:.0f}M parameters > --max-params", seconds=0.0)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, img_size, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty on timeout, or the child died
        result = dict(status=SLOW if proc.is_alive() else FAIL, error=f"no result within {timeout}s")
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    result["seconds"] = round(time.time() - t0, 2)
    result["params_m"] = round(n_params / 1e6, 2)
    return result


def summarize(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    fams: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in results.values():
        fams[r["family"]][r["status"]] += 1
    total: Dict[str, int] = defaultdict(int)
    for counts in fams.values():
        for k, v in counts.items():
            total[k] += v

    def frac(c: Dict[str, int]) -> Optional[float]:
        tried = c.get(OK, 0) + c.get(FAIL, 0)
        return round(c.get(OK, 0) / tried, 4) if tried else None

    return dict(
        overall=dict(total, fraction_ok=frac(total)),
        families={f: dict(c, fraction_ok=frac(c)) for f, c in sorted(fams.items())},
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="*", help="timm.list_models glob (default: all)")
    parser.add_argument("--sample", type=int, default=0, help="random sample of this many architectures (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--img-size", type=int, default=64, help="input size for models that take any size")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per model (else 'skipped: too slow')")
    parser.add_argument("--max-params", type=float, default=150e6, help="larger models are 'skipped: too slow'")
    parser.add_argument("--output", default="coverage_timm.json", help="JSON file with every result")
    parser.add_argument("--retry-failed", action="store_true", help="rerun only the failures recorded in --output")
    args = parser.parse_args(argv)

    names = timm.list_models(args.filter)
    if args.sample and args.sample < len(names):
        names = sorted(random.Random(args.seed).sample(names, args.sample))
    results: Dict[str, Dict[str, Any]] = {}
    if args.retry_failed:
        with open(args.output) as f:
            results = json.load(f)["results"]
        names = [n for n, r in results.items() if r["status"] == FAIL]
    for i, name in enumerate(names, 1):
        r = run_one(name, args.img_size, args.timeout, args.max_params)
        r["family"] = family(name)
        results[name] = r
        print(f"[{i}/{len(names)}] {name:50s} {r['status']:32s} {r['seconds']:6.1f}s {r.get('error', '')}", flush=True)
        with open(args.output, "w") as f:  # rewritten every model: a partial run still leaves its results
            json.dump(dict(args=vars(args), summary=summarize(results), results=results), f, indent=1)
    summary = summarize(results)
    print("\nfamily                          ok  fail  slow  broken  fraction_ok")
    for fam, c in summary["families"].items():
        counts = f"{c.get(OK, 0):4d} {c.get(FAIL, 0):5d} {c.get(SLOW, 0):5d} {c.get(BROKEN, 0):7d}"
        print(f"{fam:30s} {counts}  {c['fraction_ok']}")
    o = summary["overall"]
    print(
        f"\noverall: {o.get(OK, 0)} ok, {o.get(FAIL, 0)} fail -> {o['fraction_ok']} of the architectures tried; "
        f"{o.get(SLOW, 0)} skipped as too slow, {o.get(BROKEN, 0)} fail on their own. Results: {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
