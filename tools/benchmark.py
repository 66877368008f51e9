"""Does self-distillation pay against what users would pick instead, and what does it cost?

Trains every arm (``tools/bench/arms.py``) on the same CIFAR-10 subset, recipe and seeds, measures its cost against
plain cross-entropy (``ce``), and saves the tables as JSON and Markdown next to a PNG. See docs/results.md.

    python -m tools.benchmark --quick --arms ce byot pskd     # smoke run: a few hundred images, one epoch
"""

from __future__ import annotations

import argparse
import ast
import importlib
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sd_plugin._provenance import command_line, environment
from sd_plugin.deploy._timing import medians
from tools.bench.arms import BASELINE_ARM, parse_arms
from tools.bench.cost import TrainArm, exit_flops, flops_ratio, interleaved_times, probe_peak_memory
from tools.bench.data import DEFAULT_DATA_ROOT, DataSplits, write_subsets
from tools.bench.report import arm_results, plot, render_markdown, save_json

REPO = Path(__file__).resolve().parent.parent
ROUTES = {"mmpretrain": "tools.bench.mmpretrain_route", "timm": "tools.bench.timm_route"}
QUICK = dict(train_images=320, test_images=200, val_images=100, epochs=1, width=8, batch_size=32, workers=0)


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _sd_option(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` of a ``SelfDistillConfig`` field; VALUE a Python literal (``0.125``, ``(0, 2)``) or a word."""
    from sd_plugin import SelfDistillConfig

    key, sep, value = text.partition("=")
    if not sep or key not in SelfDistillConfig.option_names():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, KEY one of {list(SelfDistillConfig.option_names())}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--route", choices=sorted(ROUTES), default="mmpretrain", help="framework of every arm")
    p.add_argument("--arms", nargs="+", default=["ce", "byot"], help="see tools/bench/arms.py; ce is always run")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="CIFAR-10 with train/ and test/")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1; quick: 0)")
    p.add_argument("--epochs", type=_positive, default=15)
    p.add_argument("--train-images", type=_positive, default=10000, help="stratified train subset size")
    p.add_argument("--calib-images", type=int, default=2000, help="held out for `sd-plugin report --calib-ann`")
    p.add_argument("--test-images", type=_positive, default=None, help="test subset size (default: all)")
    p.add_argument("--val-images", type=_positive, default=2000, help="per-epoch validation part of the test set")
    p.add_argument("--width", type=_positive, default=16, help="base channels of the ResNet-18")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--workers", type=int, default=1, help="data loader workers per run")
    p.add_argument("--jobs", type=_positive, default=1, help="training runs at a time (cost is measured alone)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads per process (1: robust when shared)")
    sd_help = "option of every arm with exits (repeatable), e.g. exit_hidden_ratio=0.125"
    p.add_argument("--sd-option", type=_sd_option, action="append", default=[], metavar="KEY=VALUE", help=sd_help)
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}, fewer cost rounds")
    p.add_argument("--no-train", action="store_true", help="cost measurement only (no accuracy rows)")
    p.add_argument("--no-cost", action="store_true", help="accuracy only")
    p.add_argument("--step-rounds", type=_positive, default=40, help="measured interleaved training steps per arm")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured rounds before timing")
    p.add_argument("--memory-repeats", type=_positive, default=3, help="fresh-process memory probes per arm")
    p.add_argument("--name", default=None, help="output file stem (default benchmark_<route>[_quick])")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results", help="JSON and Markdown go here")
    p.add_argument("--figure-dir", type=Path, default=REPO / "docs" / "figures", help="the PNG goes here")
    p.add_argument("--work-dir", type=Path, default=None, help="runs' work dirs (default /tmp/sd_plugin_bench/<name>)")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK, step_rounds=6, warmup=2, memory_repeats=1)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    if args.no_train and args.no_cost:
        p.error("--no-train and --no-cost leave nothing to do.")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}.")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}.")
    try:
        names = [r.name for r in parse_arms(args.arms)]
    except ValueError as e:
        p.error(str(e))
    args.arms = names if BASELINE_ARM in names else [BASELINE_ARM, *names]
    args.name = args.name or f"benchmark_{args.route}" + ("_quick" if args.quick else "")
    args.work_dir = args.work_dir or Path("/tmp/sd_plugin_bench") / args.name
    return args


def _spec(route: ModuleType, args: argparse.Namespace, splits: DataSplits, arm: str, seed: int) -> Dict[str, Any]:
    work_dir = args.work_dir / f"{arm}_seed{seed}"
    options = dict(args.sd_option)
    return route.arm_spec(arm, splits, args.epochs, seed, work_dir, args.width, args.workers, args.batch_size, options)


def train_all(route: ModuleType, args: argparse.Namespace, splits: DataSplits, partial: Path) -> List[Dict[str, Any]]:
    """Train every arm for every seed (seed by seed), ``args.jobs`` at a time, each in a fresh process; ``partial``
    is rewritten after every finished run, so an interrupted benchmark still leaves every finished arm's figures."""
    runs: List[Dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {}
        for seed in args.seeds:
            for arm in args.arms:
                print(f"[benchmark] queued: {arm} seed {seed}", flush=True)
                futures[(seed, arm)] = pool.submit(route.train_run, _spec(route, args, splits, arm, seed))
        for (seed, arm), future in futures.items():
            result = future.result()
            runs.append({"arm": arm, "seed": seed, **result})
            wall, test = result["train_wall_s"], result["test"]
            print(f"[benchmark] done: {arm} seed {seed}, {wall:.0f} s, test {test}", flush=True)
            save_json(partial, {"arms": args.arms, "runs": runs})
    return runs


def _timings(times: Dict[str, List[float]], rounds: int, **extra: Any) -> Dict[str, Any]:
    """Each arm's median time over CE's in the same round (the median of those ratios), and its median time."""
    ratio = {a: statistics.median(x / y for x, y in zip(t, times[BASELINE_ARM])) for a, t in times.items()}
    median = medians(times)
    return {"ratio_vs_ce": ratio, "median_s": median, "rounds": rounds, **extra, "raw_s": times}


def measure_cost(route: ModuleType, args: argparse.Namespace, splits: DataSplits) -> Dict[str, Any]:
    """Step time (all arms interleaved), fresh-process peak memory and FLOPs of every arm, as ratios vs CE."""
    specs = {arm: _spec(route, args, splits, arm, args.seeds[0]) for arm in args.arms}
    # Training batches every arm is timed on: (sample, same-class partner) pairs when an arm uses CS-KD.
    source = next((a for a in args.arms if "cskd" in a.split("+")), BASELINE_ARM)
    batches = route.sample_batches(specs[source], 4)
    arms: List[TrainArm] = [route.build_arm(specs[a], a) for a in args.arms]
    base = arms[args.arms.index(BASELINE_ARM)]
    x = base.inputs(batches[0])
    print("[benchmark] FLOPs ...", flush=True)
    exits = {a.name: exit_flops(base.model, base.forward, a.model, x) for a in arms if getattr(a.model, "num_exits", 0)}
    flops = {a.name: exits[a.name]["flops_ratio"] if a.name in exits else flops_ratio(base, a, x) for a in arms}
    print(f"[benchmark] training-step time ({args.step_rounds} rounds, {len(arms)} arms interleaved) ...", flush=True)
    step = interleaved_times(arms, batches, rounds=args.step_rounds, warmup=args.warmup, mode="train")
    print("[benchmark] inference latency (deepest classifier, exits unused) ...", flush=True)
    infer = interleaved_times(arms, batches, rounds=2 * args.step_rounds, warmup=args.warmup, mode="infer")
    del arms, base
    print(f"[benchmark] peak memory ({args.memory_repeats} fresh processes per arm) ...", flush=True)
    probes = [(a, probe_peak_memory(route.__name__, specs[a], a)) for _ in range(args.memory_repeats) for a in specs]
    mem = {arm: [p["mib"] for a, p in probes if a == arm] for arm in args.arms}
    method = probes[-1][1]["method"]
    mem_med = medians(mem)
    return {
        "flops": {"ratio_vs_ce": flops, "exits": exits},
        "train_step": _timings(step, args.step_rounds, batch_size=int(x.shape[0])),
        "inference": _timings(infer, 2 * args.step_rounds),
        "peak_memory": {
            "method": f"fresh spawned process per probe, model build + 3 training steps: {method}",
            "ratio_vs_ce": {a: v / mem_med[BASELINE_ARM] for a, v in mem_med.items()},
            "median_mib": mem_med,
            "repeats": args.memory_repeats,
            "raw_mib": mem,
        },
    }


def _recipe(args: argparse.Namespace, splits: DataSplits, route: ModuleType, wall_s: float) -> str:
    cmd, model = command_line("tools.benchmark"), route.MODEL_DESCRIPTION.format(width=args.width)
    sd = ", ".join(args.arms) + " (tools/bench/arms.py)"
    if args.sd_option:
        sd += ", with " + ", ".join(f"{k}={v!r}" for k, v in args.sd_option)
    machine = (
        f"Machine: {platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores (shared), torch threads "
        f"{args.threads} per process, {args.jobs} run(s) at a time. Versions: {environment()['versions']}. "
        f"Wall time {wall_s / 60:.1f} min, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."
    )
    if args.no_train:
        return (
            f"Cost only (--no-train): {model}, CIFAR-10 training batches of {args.batch_size} images. "
            f"Self-distillation: {sd}. Command: `{cmd}`. {machine}"
        )
    return (
        f"Recipe: {model}, CIFAR-10 stratified subset of {splits.num_train} train images, top-1 on "
        f"{splits.num_test} test images after the last epoch (curves: {splits.num_val} of them each epoch); "
        f"{args.epochs} epoch(s), batch {args.batch_size}, SGD (momentum 0.9, nesterov, wd 5e-4, lr 0.1), "
        f"{'1 warm-up epoch and ' if args.epochs > 1 else ''}cosine decay; seeds {args.seeds}. "
        f"Arms: {sd}. Command: `{cmd}`. {machine}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    # Inherited by the spawned training and memory processes (read when they import torch).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    route = importlib.import_module(ROUTES[args.route])
    try:
        sizes = (args.train_images, args.test_images, args.val_images)
        splits = write_subsets(args.data_root.expanduser(), args.work_dir / "data", *sizes, num_calib=args.calib_images)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [] if args.no_train else train_all(route, args, splits, args.work_dir / "partial.json")
    cost = None if args.no_cost else measure_cost(route, args, splits)
    wall = time.perf_counter() - start
    model = route.MODEL_DESCRIPTION.format(width=args.width)
    meta = {
        "title": f"{args.route} route, {model} on {args.data_root.expanduser().name}",
        "recipe": _recipe(args, splits, route, wall),
        "route": args.route,
        "argv": sys.argv[1:],
        "wall_s": wall,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
    }
    acc = arm_results(runs, args.arms) if runs else {"seeds": [], "arms": []}
    json_path, md_path = args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}.md"
    save_json(json_path, {"meta": meta, "accuracy": acc, "cost": cost, "runs": runs})
    table = render_markdown(acc, cost, meta)
    md_path.write_text(table)
    png = args.figure_dir / f"{args.name}.png"
    if acc["arms"]:
        plot(png, acc, runs, meta["title"])
    print(table)
    print(f"[benchmark] wrote {json_path}, {md_path}" + (f", {png}" if runs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
