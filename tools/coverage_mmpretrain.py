"""How much of MMPretrain the two lines handle: every packaged supervised classification config, checked.

Every config mmpretrain ships (``.mim/configs``) whose model is an ``ImageClassifier`` (or a subclass) counts; the
others are listed with the reason (self-supervised pre-training, multimodal, retrievers, detection benchmarks).
Each counted config is built twice from its own model dict, checkpoints stripped (nothing downloads): as the plain
``ImageClassifier`` and with the two lines (``custom_imports`` sd_plugin, ``model.type='SelfDistillClassifier'``),
with the same weights. In a forked subprocess with a time limit, at the config's own training input size (or
``--size``): one training step on the same batch (the config's own data preprocessor, Mixup/CutMix included), where
the deepest classifier's loss must equal the plain model's loss and every exit parameter must get a finite non-zero
gradient; then, after an SGD step, ``predict`` must equal the plain model's (weights copied over) exactly.

Configs that differ only in schedule or dataset share a model dict: each distinct (model dict, input size) is
checked once and its result counts for every config that shares it (``shared_with`` in the JSON).

Statuses: ok; fail (with sd_plugin); fails without sd_plugin (the plain model, or mmengine loading the config);
too slow or large here (over ``--max-params`` or the time limit). The fraction counts all but ``ok`` as failures.

Examples:
    python -m tools.coverage_mmpretrain --filter 'resnet/*' --output work_dirs/coverage_mmp_resnet.json
    nice -n 10 python -m tools.coverage_mmpretrain --jobs 2 --timeout 600 --output docs/results/coverage_mmpretrain.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Tuple

from tools._coverage_mmp import enumerate_configs, family, input_size, model_cfg, test_key
from tools._coverage_mmp_check import check_config
from tools._coverage_run import BROKEN, OK, cpu_count_note, failure_list, markdown_table, run_checks, summarize


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="*", help="glob on 'family/file.py' under .mim/configs (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="checks run at the same time (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per check (default 600)")
    parser.add_argument(
        "--size",
        type=int,
        default=0,
        help="0 (default): every config at its own training input size; N: at the smallest of N, 2N and its own "
        "size that the plain model takes (backbones with img_size get it), for a machine too small for the full run",
    )
    parser.add_argument("--max-params", type=float, default=400e6, help="larger models count as too large here")
    parser.add_argument("--output", default="coverage_mmpretrain.json", help="JSON file with every result")
    parser.add_argument("--table", default="", help="also write the Markdown table and failure list here")
    parser.add_argument("--retry", default="", help="rerun only the results with this status (e.g. fail) in --output")
    args = parser.parse_args(argv)

    t0 = time.time()
    counted, excluded = enumerate_configs(args.filter)
    results: Dict[str, Dict[str, Any]] = {}
    if args.retry and os.path.exists(args.output):
        with open(args.output) as f:
            results = json.load(f)["results"]
    groups: Dict[str, List[str]] = defaultdict(list)
    group_args: Dict[str, Any] = {}
    for rel, cfg in counted.items():
        if rel in results and results[rel]["status"] != args.retry:
            continue
        if isinstance(cfg, str):  # mmengine cannot load it
            results[rel] = dict(status=BROKEN, error=cfg)
            continue
        size = input_size(cfg)
        model = model_cfg(cfg)
        key = test_key(model, size, args.size)
        groups[key].append(rel)
        group_args[key] = (model, size, args.size, args.max_params)
    tasks = [(key, group_args[key], args.timeout) for key in _round_robin(groups)]
    print(
        f"{len(counted)} ImageClassifier configs ({len(excluded)} other files excluded); "
        f"{sum(len(v) for v in groups.values())} to check as {len(tasks)} distinct (model dict, input size)",
        flush=True,
    )
    for i, (key, r) in enumerate(run_checks(check_config, tasks, args.jobs), 1):
        rels = groups[key]
        for rel in rels:
            results[rel] = dict(r, shared_with=[o for o in rels if o != rel])
        print(
            f"[{i}/{len(tasks)}] {rels[0]:60s} +{len(rels) - 1} {r['status']:24s} {r['seconds']:6.1f}s "
            f"{r.get('error', '')}",
            flush=True,
        )
        _write(args, results, excluded, counted, t0)
    summary = _write(args, results, excluded, counted, t0)
    print("\n" + markdown_table(summary, "family (config folder)"))
    o = summary["overall"]
    print(
        f"overall: {o.get(OK, 0)} of {o['total']} configs ok ({100 * o.get(OK, 0) / max(o['total'], 1):.1f}%). "
        f"Results: {args.output}"
    )
    return 0


_LARGE = re.compile(r"(large|huge|giant|xlarge|-[lhg]-|-[lhg]p|31l|-xl|b[5-8]|l2|w64|200|269|152|101)", re.I)


_SMALL = ("atto", "femto", "pico", "nano", "xxs", "tiny", "-t", "small", "-s", "mini", "a0", "b0", "s0", "18", "0.5")


def _smallness(rel: str) -> Tuple[int, str]:
    name = rel.rsplit("/", 1)[-1]
    return next((i for i, w in enumerate(_SMALL) if w in name), len(_SMALL)), rel


def _round_robin(groups: Dict[str, List[str]]) -> List[str]:
    """Keys ordered one family at a time in turn, small-looking first and large-looking last: a partial run
    covers every family."""
    by_family: Dict[str, List[str]] = defaultdict(list)
    for key in sorted(groups, key=lambda k: (bool(_LARGE.search(groups[k][0])), _smallness(groups[k][0]))):
        by_family[family(groups[key][0])].append(key)
    queues = [by_family[f] for f in sorted(by_family)]
    ordered = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return sorted(ordered, key=lambda k: bool(_LARGE.search(groups[k][0])))  # stable: round robin kept


def _write(args: Any, results: Dict[str, Any], excluded: Dict[str, str], counted: Dict[str, Any], t0: float) -> Any:
    summary = summarize(results, family)
    reasons = Counter(excluded.values())
    doc = dict(
        args=vars(args),
        counted=len(counted),
        excluded=dict(count=len(excluded), by_reason=dict(reasons.most_common()), files=excluded),
        distinct_checks=len(
            {r.get("shared_with") and tuple(sorted([k, *r["shared_with"]])) or k for k, r in results.items()}
        ),
        machine=cpu_count_note(),
        wall_s=round(time.time() - t0),
        summary=summary,
        results=dict(sorted(results.items())),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:  # rewritten after every check: a partial run still leaves its results
        json.dump(doc, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            f.write(markdown_table(summary, "family (config folder)"))
            f.write(failure_list(results))
    return summary


if __name__ == "__main__":
    sys.exit(main())
