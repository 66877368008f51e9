"""Machinery shared by the coverage tools: one check per forked subprocess with a time limit, and the summaries.

A check is a function ``fn(*args) -> dict`` with at least ``status`` (one of the statuses below) and, unless it
passed, ``error``. :func:`run_checks` runs many of them, ``jobs`` at a time, each in its own forked child (so a
crash, a hang or a memory blow-up costs one result, not the run), and hands every result back as it arrives.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections import defaultdict
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch  # imported before forking: every child has it already

#: Statuses: works; fails with sd_plugin; the plain model fails without sd_plugin; too slow/large for this machine.
OK, FAIL, BROKEN, SLOW = "ok", "fail", "fails without sd_plugin", "too slow or large here"
STATUSES = (OK, FAIL, BROKEN, SLOW)

Task = Tuple[str, Tuple[Any, ...], float]  # (key, args of the check, time limit in seconds)


def _child(fn: Callable[..., Dict[str, Any]], args: Tuple[Any, ...], conn: Connection) -> None:
    torch.set_num_threads(1)

    def extend_limit(seconds: float) -> None:
        conn.send(("limit", float(seconds)))

    try:
        result = fn(*args, extend_limit=extend_limit) if _takes_extend(fn) else fn(*args)
    except BaseException as e:  # noqa: BLE001 - anything the check did not catch is a result too
        result = dict(status=FAIL, error=f"check crashed: {type(e).__name__}: {e}"[:400], trace=traceback.format_exc())
    conn.send(result)
    conn.close()


def _takes_extend(fn: Callable[..., Any]) -> bool:
    import inspect

    return "extend_limit" in inspect.signature(fn).parameters


def run_checks(
    fn: Callable[..., Dict[str, Any]], tasks: Sequence[Task], jobs: int = 1
) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Yield ``(key, result)`` for every task, each run as ``fn(*args)`` in a forked child with its time limit.

    A check that takes an ``extend_limit`` keyword may call ``extend_limit(seconds)`` (e.g. once it knows its model
    is large) to raise its own limit. A child past its limit is killed (``SLOW``); one that dies without a result
    (killed for memory, a crash in native code) is ``SLOW`` when the kernel killed it (SIGKILL) and ``FAIL``
    otherwise. ``seconds`` is added.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    ctx = mp.get_context("fork")
    pending = list(tasks)[::-1]
    running: Dict[Connection, Tuple[str, Any, float, float]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            key, args, limit = pending.pop()
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, args, send), daemon=True)
            proc.start()
            send.close()
            running[recv] = (key, proc, time.time(), limit)
        now = time.time()
        timeout = max(0.0, min(start + limit - now for _, _, start, limit in running.values()))
        ready = wait(list(running), timeout=min(timeout, 5.0))
        now = time.time()
        for conn in list(running):
            key, proc, start, limit = running[conn]
            result: Optional[Dict[str, Any]] = None
            if conn in ready:
                try:
                    message = conn.recv()
                    if isinstance(message, tuple) and message[0] == "limit":  # a large model: a longer limit
                        running[conn] = (key, proc, start, max(limit, message[1]))
                        continue
                    result = message
                except EOFError:  # the child died before sending
                    proc.join(5)
                    code = proc.exitcode
                    killed = code == -9
                    why = ": killed, out of memory?" if killed else ""
                    result = dict(
                        status=SLOW if killed else FAIL, error=f"the child process died (exit code {code}){why}"
                    )
            elif now - start > limit:
                result = dict(status=SLOW, error=f"no result within the {limit:.0f} s limit")
            if result is None:
                continue
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
            del running[conn]
            result["seconds"] = round(now - start, 1)
            yield key, result


def summarize(results: Dict[str, Dict[str, Any]], family_of: Callable[[str], str]) -> Dict[str, Any]:
    """Counts per family and overall; ``fraction_ok`` counts every status other than ``ok`` as a failure."""
    fams: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, r in results.items():
        fams[family_of(key)][r["status"]] += 1
    total: Dict[str, int] = defaultdict(int)
    for counts in fams.values():
        for k, v in counts.items():
            total[k] += v

    def with_fraction(c: Dict[str, int]) -> Dict[str, Any]:
        n = sum(c.values())
        return dict(c, total=n, fraction_ok=round(c.get(OK, 0) / n, 4) if n else None)

    return dict(overall=with_fraction(total), families={f: with_fraction(c) for f, c in sorted(fams.items())})


def markdown_table(summary: Dict[str, Any], family_header: str) -> str:
    """The per-family table (ok / fail / fails without sd_plugin / too slow here / total / % ok) and a total row."""
    lines = [
        f"| {family_header} | ok | fail | fails without sd_plugin | too slow or large here | total | ok % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, c: Dict[str, Any]) -> str:
        pct = f"{100 * c.get(OK, 0) / c['total']:.1f}" if c["total"] else "-"  # from the counts: no double rounding
        return f"| {name} | " + " | ".join(str(c.get(s, 0)) for s in STATUSES) + f" | {c['total']} | {pct} |"

    lines += [row(f, c) for f, c in summary["families"].items()]
    lines.append(row("**all**", summary["overall"]))
    return "\n".join(lines) + "\n"


def failure_list(results: Dict[str, Dict[str, Any]]) -> str:
    """Markdown list of every result that is not ``ok``, grouped by status then by error text."""
    out: List[str] = []
    for status in STATUSES[1:]:
        by_error: Dict[str, List[str]] = defaultdict(list)
        for key, r in sorted(results.items()):
            if r["status"] == status:
                by_error[str(r.get("error", ""))[:300]].append(key)
        if not by_error:
            continue
        out.append(f"\n### {status} ({sum(len(v) for v in by_error.values())})\n")
        for error, keys in sorted(by_error.items(), key=lambda kv: -len(kv[1])):
            out.append(f"- {len(keys)}: `{error}`\n  - " + ", ".join(keys))
    return "\n".join(out) + "\n"


def cpu_count_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPU cores, load average {load:.1f} at the end"
