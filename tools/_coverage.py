"""Machinery of the coverage tools (``tools/coverage_timm.py``, ``tools/coverage_mmpretrain.py``; docs/coverage.md).

:func:`sweep` runs the checks (``fn(*args) -> dict`` with a ``status`` below and, unless ok, an ``error``; a check may
raise :class:`Failed`) in forked children with time limits, rewriting the result files after every result.
:func:`placement_problem` refuses exits that are nested, read the input image, or sit on the deepest stage.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import re
import time
import traceback
from collections import Counter, defaultdict
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch  # imported before forking: every child has it already
import torch.nn as nn

from sd_plugin._io import atomic_write

#: Statuses: works; fails with sd_plugin; the plain model fails without sd_plugin; too slow/large for this machine.
OK, FAIL, BROKEN, SLOW = "ok", "fail", "fails without sd_plugin", "too slow or large here"
STATUSES = (OK, FAIL, BROKEN, SLOW)

Task = Tuple[str, Tuple[Any, ...], float]  # (key, args of the check, time limit in seconds)
Results = Dict[str, Dict[str, Any]]
Fn = Callable[..., Any]
_FORK = mp.get_context("fork")


class Failed(Exception):
    """A check's verdict other than ok, raised by :func:`require`."""

    def __init__(self, error: str, status: str = FAIL) -> None:
        super().__init__(error)
        self.status = status


def require(ok: Any, error: str, status: str = FAIL) -> None:
    if not ok:
        raise Failed(error, status)


def verdict(e: BaseException) -> Dict[str, str]:
    """The status and error of a check that raised ``e``: its own :class:`Failed`, else an unexpected error."""
    return dict(status=e.status, error=str(e)) if isinstance(e, Failed) else dict(status=FAIL, error=text(e)[:400])


def text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _child(fn: Fn, args: Tuple[Any, ...], conn: Connection) -> None:
    torch.set_num_threads(1)
    kw = {"extend_limit": lambda s: conn.send(("limit", float(s)))}
    try:
        result = fn(*args, **kw) if "extend_limit" in inspect.signature(fn).parameters else fn(*args)
    except BaseException as e:  # noqa: BLE001 - anything the check did not catch is a result too
        result = dict(status=FAIL, error=f"check crashed: {text(e)}"[:400], trace=traceback.format_exc())
    conn.send(result)


def run_checks(fn: Fn, tasks: Sequence[Task], jobs: int = 1) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Yield ``(key, result)`` for every task, each run as ``fn(*args)`` in a forked child with its time limit, with
    ``seconds`` added. A check that takes an ``extend_limit`` keyword may call ``extend_limit(seconds)`` (a large model)
    to raise its own limit. A child past its limit is killed (``SLOW``); one that dies without a result is ``SLOW``
    when the kernel killed it (SIGKILL: out of memory?) and ``FAIL`` otherwise."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    pending = list(tasks)[::-1]
    running: Dict[Connection, List[Any]] = {}  # [key, process, start, limit]
    while pending or running:
        while pending and len(running) < jobs:
            key, args, limit = pending.pop()
            recv, send = _FORK.Pipe(duplex=False)
            proc = _FORK.Process(target=_child, args=(fn, args, send), daemon=True)
            proc.start()
            send.close()
            running[recv] = [key, proc, time.time(), limit]
        soonest = min(start + limit for _, _, start, limit in running.values()) - time.time()
        ready, now = wait(list(running), timeout=min(max(0.0, soonest), 5.0)), time.time()
        for conn, (key, proc, start, limit) in list(running.items()):
            if conn in ready:
                try:
                    result = conn.recv()
                except EOFError:  # the child died before sending
                    proc.join(5)
                    killed = proc.exitcode == -9
                    why = f"the child process died (exit code {proc.exitcode}){': killed, out of memory?' * killed}"
                    result = dict(status=SLOW if killed else FAIL, error=why)
                if isinstance(result, tuple):  # ("limit", seconds): a large model gets a longer limit
                    running[conn][3] = max(limit, result[1])
                    continue
            elif now - start > limit:
                result = dict(status=SLOW, error=f"no result within the {limit:.0f} s limit")
            else:
                continue
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
            del running[conn]
            yield key, dict(result, seconds=round(now - start, 1))


def summarize(results: Results, family_of: Fn) -> Dict[str, Any]:
    """Counts per family and overall; ``fraction_ok`` counts every status other than ``ok`` as a failure."""
    fams: Dict[str, Counter] = defaultdict(Counter)
    for key, r in results.items():
        fams[family_of(key)][r["status"]] += 1

    def with_fraction(c: Counter) -> Dict[str, Any]:
        n = sum(c.values())
        return dict(c, total=n, fraction_ok=round(c[OK] / n, 4) if n else None)

    overall = with_fraction(sum(fams.values(), Counter()))
    return dict(overall=overall, families={f: with_fraction(c) for f, c in sorted(fams.items())})


def markdown_table(summary: Dict[str, Any], family_header: str) -> str:
    """The per-family table (ok / fail / fails without sd_plugin / too slow here / total / % ok) and a total row."""

    def row(name: str, c: Dict[str, Any]) -> str:
        pct = f"{100 * c.get(OK, 0) / c['total']:.1f}" if c["total"] else "-"  # from the counts: no double rounding
        return f"| {name} | " + " | ".join(str(c.get(s, 0)) for s in STATUSES) + f" | {c['total']} | {pct} |"

    head = f"| {family_header} | " + " | ".join(STATUSES) + " | total | ok % |\n| --- |" + " ---: |" * 6
    rows = [row(f, c) for f, c in summary["families"].items()] + [row("**all**", summary["overall"])]
    return "\n".join([head, *rows]) + "\n"


def failure_list(results: Results) -> str:
    """Markdown list of every result that is not ``ok``, grouped by status then by error text."""
    out: List[str] = []
    for status in STATUSES[1:]:
        by_error: Dict[str, List[str]] = defaultdict(list)
        for key, r in sorted(results.items()):
            if r["status"] == status:
                by_error[str(r.get("error", ""))[:300]].append(key)
        if by_error:
            out.append(f"\n### {status} ({sum(len(v) for v in by_error.values())})\n")
            for error, keys in sorted(by_error.items(), key=lambda kv: -len(kv[1])):
                out.append(f"- {len(keys)}: `{error}`\n  - " + ", ".join(keys))
    return "\n".join(out) + "\n"


def parser(doc: Optional[str], timeout: float, max_params: float, name: str) -> argparse.ArgumentParser:
    """The flags both tools have; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1, help="checks run at the same time (default 1)")
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds per check (default {timeout:.0f})")
    p.add_argument("--max-params", type=float, default=max_params, help="larger models count as too large here")
    p.add_argument("--output", default=f"coverage_{name}.json", help="JSON file with every result")
    p.add_argument("--table", default="", help="also write the Markdown table and failure list here")
    p.add_argument("--retry", default="", help="rerun only the results with this status (e.g. fail) in --output")
    return p


def previous(args: argparse.Namespace) -> Results:
    """With ``--retry``: the results already in ``--output`` (those of other statuses are kept, not rerun)."""
    if not (args.retry and os.path.exists(args.output)):
        return {}
    return dict(json.loads(Path(args.output).read_text())["results"])


def sweep(
    args: Any, results: Results, tasks: List[Task], check: Fn, store: Fn, family_of: Fn, header: str, extra: Fn
) -> None:
    """Run the checks; ``store(key, result)`` puts a result into ``results`` and gives its progress label. After
    every result the JSON file is rewritten (args, ``extra()``, machine, wall time, summary, results), and with
    ``--table`` the Markdown table of families (first column ``header``) and the failure list."""
    t0 = time.time()

    def write() -> Dict[str, Any]:
        summary = summarize(results, family_of)
        machine = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end"
        doc = dict(args=vars(args), **extra(), machine=machine, wall_s=round(time.time() - t0), summary=summary)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with atomic_write(args.output, "w") as f:  # rewritten after every result: never left half-written
            json.dump(dict(doc, results=dict(sorted(results.items()))), f, indent=1)
        if args.table:
            Path(args.table).write_text(markdown_table(summary, header) + failure_list(results))
        return summary

    for i, (key, r) in enumerate(run_checks(check, tasks, args.jobs), 1):
        print(
            f"[{i}/{len(tasks)}] {store(key, r)} {r['status']:24s} {r['seconds']:6.1f}s {r.get('error', '')}",
            flush=True,
        )
        write()
    summary = write()
    o = summary["overall"]
    print(f"\n{markdown_table(summary, header)}\noverall: {o.get(OK, 0)} of {o['total']} ok. Results: {args.output}")


def _deeper_after(model: Any, k: int, x: Optional[torch.Tensor]) -> bool:
    """Whether the model's final features (``forward_features``, else the tapped module's output) are at another
    resolution than exit ``k``'s feature: more downsampling runs after the container (SelecSLS's ``head``
    convolutions after ``features``), so its last element is not the deepest stage. False when it cannot tell."""
    if x is None:
        return False
    tapped, fmt = model.tapped_module(), str(getattr(list(model.exit_points)[k], "fmt", ""))
    getattr(model.exit_engine, "ensure_installed", lambda: None)()
    with torch.no_grad():
        feature = model.exit_engine.run_to(k, lambda: model.forward_deepest(x))
        final = (getattr(tapped, "forward_features", None) or tapped)(x)
    while isinstance(final, (tuple, list)) and final:
        final = final[-1]
    if not (isinstance(final, torch.Tensor) and final.dim() == 4 and isinstance(feature, torch.Tensor)):
        return False
    if feature.dim() < 3 or fmt not in ("NHWC", "NCHW"):
        return False
    exit_hw = tuple(feature.shape[1:3]) if fmt == "NHWC" else tuple(feature.shape[2:])
    return exit_hw not in (tuple(final.shape[2:]), tuple(final.shape[1:3]))


def placement_problem(model: Any, x: Optional[torch.Tensor]) -> Optional[str]:
    """Why the exits of ``model`` (a ``MultiExitModel`` in eval mode) are misplaced, or None; ``x`` is an input."""
    modules = dict(model.tapped_module().named_modules(remove_duplicate=False))
    names = [str(p.module) for p in model.exit_points]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a == b or b.startswith(a + ".") or a.startswith(b + ".") or "" in (a, b):
                return f"exit modules {a!r} and {b!r} are the same module or nested"
    for k, name in enumerate(names):
        parent, _, index = name.rpartition(".")
        numbered = re.fullmatch(r"(.*?)(\d+)", parent)  # CoaT's ``serial_blocks2`` before ``serial_blocks3``
        if not index.isdigit() or parent.rpartition(".")[2].isdigit():  # Twins' ``stages.0.1``: a stage end
            continue
        if numbered and f"{numbered[1]}{int(numbered[2]) + 1}" in modules:
            continue
        container = modules[parent]
        is_list = isinstance(container, (nn.ModuleList, nn.Sequential))
        if is_list and int(index) == len(container) - 1 > 0 and not _deeper_after(model, k, x):
            return f"exit at {name!r}, the last of the {len(container)} modules in {parent or 'the model'!r}"
    engine = getattr(model, "exit_engine", None)
    if engine is None or x is None:
        return None
    getattr(engine, "ensure_installed", lambda: None)()
    with torch.no_grad(), engine.capture() as cap:
        model.forward_deepest(x)
    for name, f in zip(names, cap.features):
        if isinstance(f, torch.Tensor) and f.shape == x.shape and torch.equal(f, x):
            return f"exit at {name!r} reads the input image itself"
        if isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[1] == x.shape[1] and f.shape[0] == x.shape[0]:
            return f"exit at {name!r} reads a {tuple(f.shape)} feature with the input's {x.shape[1]} channels"
    return None
