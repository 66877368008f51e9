"""How much of timm ``sd_plugin.wrap`` handles: wrap + one training step per architecture, measured.

The architectures: a seeded random sample of timm's registry (``--sample 300 --seed 0``) plus, for every timm
model module (``timm.list_modules()``) the sample leaves out, its smallest architecture (``--no-per-module`` to
skip). Each one is built (random init, nothing downloads) at ``--img-size`` when it takes that size, else at its
own, in a forked subprocess with a time limit (``--timeout``; ``--large-timeout`` for models over
``--large-params``), wrapped, trained for one step (finite loss; every exit parameter gets a finite non-zero
gradient), and checked in eval mode against the plain model (identical output); ``unwrap`` must give back the same
model, same keys, no hooks left, identical output.

Statuses: ok; fail (with sd_plugin); fails without sd_plugin (timm's own model fails at both sizes); too slow or
large here (over ``--max-params`` or the time limit). The fraction counts all but ``ok`` as failures. Results
go to a JSON file, per family (timm module) and per architecture; ``--table`` also writes the Markdown table.

Examples:
    python -m tools.coverage_timm --filter 'resnet*' --no-per-module --output work_dirs/coverage_resnet.json
    nice -n 10 python -m tools.coverage_timm --sample 300 --seed 0 --output docs/results/coverage_timm.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import timm

from tools._coverage_run import OK, cpu_count_note, failure_list, markdown_table, run_checks, summarize
from tools._coverage_timm import check, family, select


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="*", help="timm.list_models glob (default: all)")
    parser.add_argument("--sample", type=int, default=0, help="random sample of this many architectures (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument(
        "--no-per-module",
        dest="per_module",
        action="store_false",
        help="do not add the smallest architecture of every timm module the sample leaves out",
    )
    parser.add_argument("--img-size", type=int, default=64, help="input size for models that take any size")
    parser.add_argument("--jobs", type=int, default=1, help="checks run at the same time (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model (default 120)")
    parser.add_argument("--large-params", type=float, default=150e6, help="models above this get --large-timeout")
    parser.add_argument("--large-timeout", type=float, default=900.0, help="seconds per large model (default 900)")
    parser.add_argument("--max-params", type=float, default=700e6, help="larger models count as too large here")
    parser.add_argument("--output", default="coverage_timm.json", help="JSON file with every result")
    parser.add_argument("--table", default="", help="also write the Markdown table and failure list here")
    parser.add_argument("--retry", default="", help="rerun only the results with this status (e.g. fail) in --output")
    args = parser.parse_args(argv)

    t0 = time.time()
    chosen = select(args.filter, args.sample, args.seed, args.per_module)
    results: Dict[str, Dict[str, Any]] = {}
    if args.retry and os.path.exists(args.output):
        with open(args.output) as f:
            results = json.load(f)["results"]
    tasks = [
        (name, (name, args.img_size, (args.max_params, args.large_params, args.large_timeout)), args.timeout)
        for name in chosen
        if not (name in results and results[name]["status"] != args.retry)
    ]
    tasks.sort(key=lambda t: _order(t[0], chosen))  # families in turn, large-looking names last
    print(
        f"{len(chosen)} architectures ({sum(v == 'module' for v in chosen.values())} added per module), "
        f"{len(tasks)} to check",
        flush=True,
    )
    for i, (name, r) in enumerate(run_checks(check, tasks, args.jobs), 1):
        results[name] = dict(r, selected=chosen[name])
        print(f"[{i}/{len(tasks)}] {name:50s} {r['status']:24s} {r['seconds']:6.1f}s {r.get('error', '')}", flush=True)
        _write(args, results, t0)
    summary = _write(args, results, t0)
    print("\n" + markdown_table(summary, "timm module"))
    o = summary["overall"]
    print(
        f"overall: {o.get(OK, 0)} of {o['total']} architectures ok ({100 * o.get(OK, 0) / max(o['total'], 1):.1f}%), "
        f"timm {timm.__version__}. Results: {args.output}"
    )
    return 0


_LARGE = re.compile(r"(large|huge|giant|gigantic|xlarge|_h14|_g14|_l16|_l14|_l32|_b16_384|_so400m|_1b|_6b|xxl)", re.I)


def _order(name: str, chosen: Dict[str, str]) -> Tuple[bool, int, str]:
    same_family = sorted(n for n in chosen if family(n) == family(name))
    return bool(_LARGE.search(name)), same_family.index(name), name


def _write(args: Any, results: Dict[str, Dict[str, Any]], t0: float) -> Dict[str, Any]:
    summary = summarize(results, family)
    doc = dict(
        args=vars(args),
        timm=timm.__version__,
        registry_size=len(timm.list_models()),
        modules=len(timm.list_modules()),
        machine=cpu_count_note(),
        wall_s=round(time.time() - t0),
        summary=summary,
        results=dict(sorted(results.items())),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:  # rewritten after every model: a partial run still leaves its results
        json.dump(doc, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            f.write(markdown_table(summary, "timm module"))
            f.write(failure_list(results))
    return summary


if __name__ == "__main__":
    sys.exit(main())
