"""Does self-distillation pay against what users would pick instead, and what does it cost?

Every arm (``--arms ce ls byot byot+ls pskd cskd tfkd ...``, see
``tools/bench/arms.py``) shares everything but its training method: data
subset, recipe, epochs and seeds. For every seed the tool trains every arm on
CIFAR-10 (ImageFolder layout) and reads the top-1 of the last epoch (per exit,
deepest, ensemble); then it measures every arm's cost against plain
cross-entropy (``ce``) in one process: training-step time with all arms
interleaved on the same batches, peak training memory in fresh processes, and
the FLOPs of the training forward. It prints the Results tables and saves them
as JSON and Markdown next to a PNG.

Examples (from the repository root)::

    python -m tools.benchmark --arms ce ls byot byot+ls pskd cskd tfkd --seeds 0 1 --epochs 6 --train-images 8000
    python -m tools.benchmark --route timm --arms ce byot     # the timm route (sd_plugin.wrap + SelfDistillLoss)
    python -m tools.benchmark --quick --arms ce byot pskd     # smoke run: a few hundred images, one epoch
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

from tools.bench.arms import BASELINE_ARM, parse_arms
from tools.bench.cost import TrainArm, exit_flops, flops_of, interleaved_times, probe_peak_memory
from tools.bench.data import DEFAULT_DATA_ROOT, DataSplits, write_subsets
from tools.bench.profile import render_breakdown, step_breakdown
from tools.bench.report import arm_results, plot, render_markdown, save_json

REPO = Path(__file__).resolve().parent.parent
ROUTES = {"mmpretrain": "tools.bench.mmpretrain_route", "timm": "tools.bench.timm_route"}
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
    p.add_argument("--route", choices=sorted(ROUTES), default="mmpretrain", help="framework of every arm")
    p.add_argument(
        "--arms",
        nargs="+",
        default=["ce", "byot"],
        help="arms to compare, '+'-joined components of ce, ls, byot, byotrms, pskd, cskd, tfkd, zipf, mixup, "
        "cutmix (default: ce byot); "
        "ce is always measured, as the baseline",
    )
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="CIFAR-10 with train/ and test/")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1; quick: 0)")
    p.add_argument("--epochs", type=_positive, default=15)
    p.add_argument("--train-images", type=_positive, default=10000, help="stratified train subset size")
    p.add_argument(
        "--calib-images",
        type=int,
        default=2000,
        help="held-out training images listed in <work-dir>/data/calib_subset.txt for `sd-plugin report "
        "--calib-ann` (skipped when the training set has too few left)",
    )
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
        help="self-distillation option of every arm with exits or a method (repeatable), e.g. exit_hidden_ratio=0.125",
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
    try:
        recipes = parse_arms(args.arms)
    except ValueError as e:
        p.error(str(e))
    if BASELINE_ARM not in [r.name for r in recipes]:
        recipes.insert(0, parse_arms([BASELINE_ARM])[0])
    args.arms = [r.name for r in recipes]
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
    """Train every arm for every seed (seed by seed), ``args.jobs`` at a time, each in a fresh process.

    Progress goes to ``partial`` after every finished run, so an interrupted
    benchmark still leaves every finished arm's figures.
    """
    jobs = [(seed, arm) for seed in args.seeds for arm in args.arms]
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
            save_json(partial, {"arms": args.arms, "runs": runs})
    return runs


def _cost_batches(route: ModuleType, args: argparse.Namespace, splits: DataSplits) -> List[Any]:
    """Training batches every arm is timed on; (sample, same-class partner) pairs when an arm uses CS-KD."""
    seed = args.seeds[0]
    pairs = [a for a in args.arms if "cskd" in a.split("+")]
    source = pairs[0] if pairs else BASELINE_ARM
    return route.sample_batches(_spec(route, args, splits, source, seed), 4)


def _flops_ratio(route: ModuleType, base: TrainArm, arm: TrainArm, x: Any) -> float:
    """Training-forward FLOPs of an arm (model and exits) over the plain model's."""
    from sd_plugin.core import MultiExitModel

    if isinstance(arm.model, MultiExitModel):
        return float(exit_flops(base.model, route.plain_forward(base), arm.model, x)["flops_ratio"])
    return flops_of(arm.model, route.plain_forward(arm), x) / flops_of(base.model, route.plain_forward(base), x)


def measure_cost(route: ModuleType, args: argparse.Namespace, splits: DataSplits) -> Dict[str, Any]:
    """Step time (all arms interleaved), fresh-process peak memory and FLOPs of every arm, as ratios vs CE."""
    seed = args.seeds[0]
    specs = {arm: _spec(route, args, splits, arm, seed) for arm in args.arms}
    batches = _cost_batches(route, args, splits)
    arms = [route.build_arm(specs[a], a) for a in args.arms]
    base = arms[args.arms.index(BASELINE_ARM)]
    x = route.flops_inputs(base, batches[0])
    print("[benchmark] FLOPs ...", flush=True)
    flops = {a.name: _flops_ratio(route, base, a, x) for a in arms}
    exits = {
        a.name: exit_flops(base.model, route.plain_forward(base), a.model, x)
        for a in arms
        if getattr(a.model, "num_exits", 0)
    }
    print(f"[benchmark] training-step time ({args.step_rounds} rounds, {len(arms)} arms interleaved) ...", flush=True)
    step = interleaved_times(arms, batches, rounds=args.step_rounds, warmup=args.warmup, mode="train")
    breakdown = None
    if args.profile:
        exit_arms = [a for a in arms if getattr(a.model, "num_exits", 0)]
        if exit_arms:
            print(f"[benchmark] step breakdown ({exit_arms[0].name} vs ce) ...", flush=True)
            base.name, exit_arms[0].name, names = "plain", "sd", (base.name, exit_arms[0].name)
            breakdown = step_breakdown([base, exit_arms[0]], batches, rounds=args.step_rounds, warmup=args.warmup)
            base.name, exit_arms[0].name = names
    print("[benchmark] inference latency (deepest classifier, exits unused) ...", flush=True)
    infer = interleaved_times(arms, batches, rounds=2 * args.step_rounds, warmup=args.warmup, mode="infer")
    del arms, base
    print(f"[benchmark] peak memory ({args.memory_repeats} fresh processes per arm) ...", flush=True)
    mem: Dict[str, List[float]] = {a: [] for a in args.arms}
    method = ""
    for _ in range(args.memory_repeats):
        for arm in args.arms:
            probe = probe_peak_memory(route.__name__, specs[arm], arm, num_batches=2, steps=3)
            mem[arm].append(probe["mib"])
            method = probe["method"]
    mem_med = {a: statistics.median(v) for a, v in mem.items()}
    base_steps = step[BASELINE_ARM]
    return {
        "breakdown": breakdown,
        "flops": {"ratio_vs_ce": flops, "exits": exits},
        "train_step": {
            "ratio_vs_ce": {a: statistics.median(x / y for x, y in zip(t, base_steps)) for a, t in step.items()},
            "median_s": {a: statistics.median(t) for a, t in step.items()},
            "rounds": args.step_rounds,
            "batch_size": int(x.shape[0]),
            "raw_s": step,
        },
        "inference": {
            "ratio_vs_ce": {
                a: statistics.median(x / y for x, y in zip(t, infer[BASELINE_ARM])) for a, t in infer.items()
            },
            "median_s": {a: statistics.median(t) for a, t in infer.items()},
            "rounds": 2 * args.step_rounds,
            "raw_s": infer,
        },
        "peak_memory": {
            "method": f"fresh spawned process per probe, model build + 3 training steps: {method}",
            "ratio_vs_ce": {a: v / mem_med[BASELINE_ARM] for a, v in mem_med.items()},
            "median_mib": mem_med,
            "repeats": args.memory_repeats,
            "raw_mib": mem,
        },
    }


def _recipe(args: argparse.Namespace, splits: DataSplits, route: ModuleType, wall_s: float) -> str:
    cmd = "python -m tools.benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    sd = ", ".join(args.arms) + " (tools/bench/arms.py)"
    if args.sd_options:
        sd += ", with " + ", ".join(f"{k}={v!r}" for k, v in args.sd_options.items())
    from sd_plugin._provenance import environment  # imports torch: not before the thread settings

    machine = (
        f"Machine: {platform.machine()} CPU, {_cpu_count()} cores (shared), torch threads {_threads()} per process, "
        f"{args.jobs} run(s) at a time. Versions: {environment()['versions']}. Wall time {wall_s / 60:.1f} min, "
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
        f"Arms: {sd}. Command: `{cmd}`. {machine}"
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
            args.data_root.expanduser(),
            args.work_dir / "data",
            args.train_images,
            args.test_images,
            args.val_images,
            num_calib=args.calib_images,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json_path = args.out_dir / f"{args.name}.json"
    runs = [] if args.no_train else train_all(route, args, splits, args.work_dir / "partial.json")
    cost = None if args.no_cost else measure_cost(route, args, splits)
    wall = time.perf_counter() - start
    meta = {
        "title": f"{args.route} route, {route.MODEL_DESCRIPTION.format(width=args.width)} on "
        f"{args.data_root.expanduser().name}",
        "recipe": _recipe(args, splits, route, wall),
        "route": args.route,
        "argv": sys.argv[1:],
        "wall_s": wall,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
    }
    acc = arm_results(runs, args.arms) if runs else {"seeds": [], "arms": []}
    payload = {"meta": meta, "accuracy": acc, "cost": cost, "runs": runs}
    save_json(json_path, payload)
    table = render_markdown(acc, cost, meta)
    if cost is not None and cost["breakdown"] is not None:
        byot = next(iter(cost["flops"]["exits"].values()))
        table += "\nTraining-step breakdown (medians, first arm with exits vs ce):\n\n" + render_breakdown(
            cost["breakdown"], byot["flops_ratio"]
        )
    md_path = args.out_dir / f"{args.name}.md"
    md_path.write_text(table)
    if acc["arms"]:
        plot(args.figure_dir / f"{args.name}.png", acc, runs, meta["title"])
    print(table)
    print(f"[benchmark] wrote {json_path}, {md_path}" + (f", {args.figure_dir / (args.name + '.png')}" if runs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
