"""Does self-distillation pay, and what does it cost? Plain model vs the same model with self-distillation.

Both arms share everything but self-distillation: data subset, recipe, epochs
and seed. For every seed the tool trains both arms on CIFAR-10 (ImageFolder
layout), reads the per-exit top-1 of the last epoch, and measures the cost side
by side (FLOPs ratio of the exits, interleaved training-step time, peak
training memory in fresh processes, inference latency with the exits unused).
It prints one Results table and saves it as JSON and Markdown next to a PNG.

Examples::

    # the reported CPU recipe (MMPretrain route)
    python tools/benchmark.py --route mmpretrain --seeds 0 1 --epochs 15 --train-images 10000
    # smoke run: a few hundred images, one epoch, a tiny model
    python tools/benchmark.py --route timm --quick --out-dir /tmp/bench --figure-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import ast
import importlib
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_cost import exit_flops, interleaved_times, probe_peak_memory, summarise_pairs  # noqa: E402
from _bench_data import DEFAULT_DATA_ROOT, DataSplits, write_subsets  # noqa: E402
from _bench_profile import render_breakdown, step_breakdown  # noqa: E402
from _bench_report import accuracy_rows, plot, render_markdown, save_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ROUTES = {"mmpretrain": "_bench_mmpretrain", "timm": "_bench_timm"}
QUICK = dict(train_images=320, test_images=200, val_images=100, epochs=1, width=8, batch_size=32, workers=0)


def _sd_option(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` of a ``SelfDistillConfig`` field; VALUE a Python literal (``0.125``, ``(0, 2)``) or a word."""
    from sd_plugin import SelfDistillConfig

    key, sep, value = text.partition("=")
    if not sep or key not in SelfDistillConfig.option_names():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY one of {list(SelfDistillConfig.option_names())}, got {text!r}"
        )
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word, e.g. predict_exit=ensemble


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--route", choices=sorted(ROUTES), default="mmpretrain", help="framework of both arms")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="CIFAR-10 with train/ and test/")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1; quick: 0)")
    p.add_argument("--epochs", type=_positive, default=15)
    p.add_argument("--train-images", type=_positive, default=10000, help="stratified train subset size")
    p.add_argument("--test-images", type=_positive, default=None, help="test subset size (default: all)")
    p.add_argument(
        "--val-images", type=_positive, default=2000, help="per-epoch validation subset of the test set (curves only)"
    )
    p.add_argument("--width", type=_positive, default=16, help="base channels of the ResNet-18")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--workers", type=int, default=1, help="data loader workers per run")
    p.add_argument("--jobs", type=_positive, default=1, help="training runs at a time (cost is measured alone)")
    p.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch/OpenMP threads of every process (1 is the robust choice on a shared, oversubscribed CPU)",
    )
    p.add_argument(
        "--sd-option",
        type=_sd_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="self-distillation option of the sd arm (repeatable), e.g. exit_hidden_ratio=0.125",
    )
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}, fewer cost rounds")
    p.add_argument("--no-train", action="store_true", help="cost measurement only (no accuracy rows)")
    p.add_argument("--no-cost", action="store_true", help="accuracy only")
    p.add_argument("--profile", action="store_true", help="also split the training step into phases (MMPretrain route)")
    p.add_argument("--step-rounds", type=_positive, default=40, help="measured interleaved training steps per arm")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured rounds before timing")
    p.add_argument("--memory-repeats", type=_positive, default=3, help="fresh-process memory probes per arm")
    p.add_argument("--name", default=None, help="output file stem (default benchmark_<route>[_quick])")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results", help="JSON and Markdown go here")
    p.add_argument("--figure-dir", type=Path, default=REPO / "docs" / "figures", help="the PNG goes here")
    p.add_argument("--work-dir", type=Path, default=None, help="runs' work dirs (default /tmp/sd_plugin_bench/<name>)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.step_rounds, args.warmup, args.memory_repeats = 6, 2, 1
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    if args.no_train and args.no_cost:
        p.error("--no-train and --no-cost leave nothing to do.")
    if args.profile and (args.no_cost or args.route != "mmpretrain"):
        p.error("--profile needs the cost measurement (no --no-cost) and --route mmpretrain.")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}.")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}.")
    args.sd_options = dict(args.sd_option)
    args.name = args.name or f"benchmark_{args.route}" + ("_quick" if args.quick else "")
    args.work_dir = args.work_dir or Path("/tmp/sd_plugin_bench") / args.name
    return args


def _spec(route: ModuleType, args: argparse.Namespace, splits: DataSplits, arm: str, seed: int) -> Dict[str, Any]:
    return route.arm_spec(
        arm,
        splits,
        epochs=args.epochs,
        seed=seed,
        work_dir=args.work_dir / f"{arm}_seed{seed}",
        width=args.width,
        num_workers=args.workers,
        batch_size=args.batch_size,
        sd_options=args.sd_options,
    )


def train_all(route: ModuleType, args: argparse.Namespace, splits: DataSplits, partial: Path) -> List[Dict[str, Any]]:
    """Train both arms for every seed, ``args.jobs`` at a time, each in a fresh process; progress to ``partial``."""
    jobs = [(seed, arm) for seed in args.seeds for arm in ("plain", "sd")]
    runs: List[Dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {}
        for seed, arm in jobs:
            print(f"[benchmark] queued: {arm} seed {seed}", flush=True)
            futures[(seed, arm)] = pool.submit(route.train_run, _spec(route, args, splits, arm, seed))
        for (seed, arm), future in futures.items():
            result = future.result()
            runs.append({"arm": arm, "seed": seed, **result})
            print(
                f"[benchmark] done: {arm} seed {seed}, {result['train_wall_s']:.0f} s, test {result['test']}",
                flush=True,
            )
            save_json(partial, {"runs": runs})
    return runs


def measure_cost(route: ModuleType, args: argparse.Namespace, splits: DataSplits) -> Dict[str, Any]:
    """FLOPs ratio, interleaved step time, fresh-process peak memory and inference latency of both arms."""
    seed = args.seeds[0]
    specs = {arm: _spec(route, args, splits, arm, seed) for arm in ("plain", "sd")}
    batches = route.sample_batches(specs["plain"], 4)
    arms = [route.build_arm(specs[a], a) for a in ("plain", "sd")]
    x = route.flops_inputs(arms[0], batches[0])
    print("[benchmark] FLOPs ...", flush=True)
    flops = exit_flops(arms[0].model, route.plain_forward(arms[0]), arms[1].model, x)
    print(f"[benchmark] training-step time ({args.step_rounds} interleaved rounds) ...", flush=True)
    step = interleaved_times(arms, batches, rounds=args.step_rounds, warmup=args.warmup, mode="train")
    breakdown = None
    if args.profile:
        print("[benchmark] step breakdown ...", flush=True)
        breakdown = step_breakdown(arms, batches, rounds=args.step_rounds, warmup=args.warmup)
    print("[benchmark] inference latency ...", flush=True)
    infer = interleaved_times(arms, batches, rounds=2 * args.step_rounds, warmup=args.warmup, mode="infer")
    # A/A: the plain model against a second copy of itself, the noise floor of the inference ratio.
    twin = route.build_arm(specs["plain"], "plain")
    twin.name = "twin"
    infer_aa = interleaved_times(
        [arms[0], twin], batches, rounds=2 * args.step_rounds, warmup=args.warmup, mode="infer"
    )
    del arms, twin
    print(f"[benchmark] peak memory ({args.memory_repeats} fresh processes per arm) ...", flush=True)
    mem: Dict[str, List[float]] = {"plain": [], "sd": []}
    method = ""
    for _ in range(args.memory_repeats):
        for arm in ("plain", "sd"):
            probe = probe_peak_memory(route.__name__, specs[arm], arm, num_batches=2, steps=3)
            mem[arm].append(probe["mib"])
            method = probe["method"]
    plain_mib, sd_mib = statistics.median(mem["plain"]), statistics.median(mem["sd"])
    batch_size = int(x.shape[0])
    return {
        "breakdown": breakdown,
        "flops": flops,
        "train_step": {
            **summarise_pairs(step),
            "rounds": args.step_rounds,
            "batch_size": batch_size,
            "raw_s": step,
        },
        "inference": {
            **summarise_pairs(infer),
            "aa_median_pair_ratio": summarise_pairs(infer_aa, num="twin")["median_pair_ratio"],
            "rounds": 2 * args.step_rounds,
            "batch_size": batch_size,
            "raw_s": infer,
        },
        "peak_memory": {
            "method": f"fresh spawned process per probe, model build + 3 training steps: {method}",
            "plain_mib": plain_mib,
            "sd_mib": sd_mib,
            "ratio": sd_mib / plain_mib,
            "repeats": args.memory_repeats,
            "raw_mib": mem,
        },
    }


def _recipe(args: argparse.Namespace, splits: DataSplits, route: ModuleType, wall_s: float) -> str:
    cmd = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    sd = "BYOT defaults (exits after stages 1-3, T = 3, alpha = 0.3, lambda = 0.03)"
    if args.sd_options:
        sd += ", except " + ", ".join(f"{k}={v!r}" for k, v in args.sd_options.items())
    machine = (
        f"Machine: {platform.machine()} CPU, {_cpu_count()} cores (shared), torch threads {_threads()} per process, "
        f"{args.jobs} run(s) at a time. Wall time {wall_s / 60:.1f} min, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."
    )
    if args.no_train:
        return (
            f"Cost only (--no-train): {route.MODEL_DESCRIPTION.format(width=args.width)}, CIFAR-10 training batches "
            f"of {args.batch_size} images. Self-distillation: {sd}. Command: `{cmd}`. {machine}"
        )
    return (
        f"Recipe: {route.MODEL_DESCRIPTION.format(width=args.width)}, CIFAR-10 stratified subset of "
        f"{splits.num_train} train images, top-1 on {splits.num_test} test images after the last epoch (curves: "
        f"{splits.num_val} of them each epoch); {args.epochs} epoch(s), "
        f"batch {args.batch_size}, SGD (momentum 0.9, nesterov, wd 5e-4, lr 0.1), "
        f"{'1 warm-up epoch and ' if args.epochs > 1 else ''}cosine decay; seeds {args.seeds}. "
        f"Self-distillation: {sd}. Command: `{cmd}`. {machine}"
    )


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    # Inherited by the spawned training and memory processes (read when they import torch).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    route = importlib.import_module(ROUTES[args.route])
    try:
        splits = write_subsets(
            args.data_root.expanduser(), args.work_dir / "data", args.train_images, args.test_images, args.val_images
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json_path = args.out_dir / f"{args.name}.json"
    runs = [] if args.no_train else train_all(route, args, splits, args.work_dir / "partial.json")
    cost = None if args.no_cost else measure_cost(route, args, splits)
    wall = time.perf_counter() - start
    meta = {
        "title": f"{args.route} route, {route.MODEL_DESCRIPTION.format(width=args.width)} on CIFAR-10",
        "recipe": _recipe(args, splits, route, wall),
        "route": args.route,
        "argv": sys.argv[1:],
        "wall_s": wall,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
    }
    acc = accuracy_rows(runs) if runs else {"seeds": [], "rows": []}
    payload = {"meta": meta, "accuracy": acc, "cost": cost, "runs": runs}
    save_json(json_path, payload)
    table = render_markdown(acc, cost, meta)
    if cost is not None and cost["breakdown"] is not None:
        table += "\nTraining-step breakdown (medians):\n\n" + render_breakdown(
            cost["breakdown"], cost["flops"]["flops_ratio"]
        )
    md_path = args.out_dir / f"{args.name}.md"
    md_path.write_text(table)
    if runs:
        plot(args.figure_dir / f"{args.name}.png", acc, runs, meta["title"])
    print(table)
    print(f"[benchmark] wrote {json_path}, {md_path}" + (f", {args.figure_dir / (args.name + '.png')}" if runs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
