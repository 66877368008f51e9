"""Turning benchmark runs into the Results table (Markdown + JSON) and the figure (matplotlib)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["exit_accuracies", "accuracy_rows", "cost_rows", "render_markdown", "save_json", "plot"]

TARGETS = {
    "step_time_vs_flops": 1.10,
    "peak_memory_ratio": 1.30,
    "inference_ratio": 1.00,
}
_EXIT_KEY = re.compile(r"exit[_\-\s]?(\d+)", re.IGNORECASE)


def exit_accuracies(metrics: Dict[str, float]) -> Dict[str, float]:
    """Top-1 (%) per exit from a metric dict: keys 'exit1'..'exitK', 'deepest' and 'ensemble' where present.

    Understands MMPretrain's ``accuracy/top1`` (the plain model: its deepest
    classifier) and per-exit keys that name ``exit<k>``, ``deepest`` or
    ``ensemble`` together with ``top1`` (or with no top-k at all).
    """
    out: Dict[str, float] = {}
    for key, value in metrics.items():
        low = key.lower()
        if "top5" in low or "loss" in low or key == "epoch":
            continue
        if "ensemble" in low:
            out["ensemble"] = float(value)
        elif "deepest" in low:
            out["deepest"] = float(value)
        elif (m := _EXIT_KEY.search(low)) is not None:
            out[f"exit{int(m.group(1))}"] = float(value)
        elif low in ("accuracy/top1", "top1", "accuracy"):
            out.setdefault("deepest", float(value))
    return out


def _mean_spread(values: Sequence[float]) -> Tuple[float, float, float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, min(values), max(values)


def _final(runs: List[Dict[str, Any]], arm: str) -> Dict[int, Dict[str, float]]:
    out = {}
    for run in runs:
        if run["arm"] == arm and (run.get("test") or run["history"]):
            out[run["seed"]] = exit_accuracies(run.get("test") or run["history"][-1])
    return out


def _exit_order(keys: Sequence[str]) -> List[str]:
    exits = sorted((k for k in keys if k.startswith("exit")), key=lambda k: int(k[4:]))
    return exits + [k for k in ("deepest", "ensemble") if k in keys]


def accuracy_rows(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-seed and aggregate accuracy rows: plain, every sd exit, deepest, ensemble, gain, error reduction.

    The sd deepest classifier is the last ``exit<k>`` when the metric numbers it
    rather than calling it 'deepest'.
    """
    plain = _final(runs, "plain")
    sd = _final(runs, "sd")
    seeds = sorted(set(plain) & set(sd))
    if not seeds:
        raise ValueError("no seed has finished runs of both arms: nothing to compare.")
    for s in seeds:
        if "deepest" not in plain[s]:
            raise ValueError(f"plain run of seed {s} reported no top-1 (metrics: {sorted(plain[s])}).")
        if "deepest" not in sd[s]:
            numbered = [k for k in sd[s] if k.startswith("exit")]
            if not numbered:
                raise ValueError(f"sd run of seed {s} reported no per-exit top-1 (metrics: {sorted(sd[s])}).")
            sd[s]["deepest"] = sd[s].pop(_exit_order(numbered)[-1])
    rows: List[Dict[str, Any]] = []

    def add(label: str, values: List[float], unit: str) -> None:
        mean, std, lo, hi = _mean_spread(values)
        rows.append({"row": label, "unit": unit, "per_seed": values, "mean": mean, "std": std, "min": lo, "max": hi})

    add("Plain model top-1", [plain[s]["deepest"] for s in seeds], "%")
    for key in _exit_order(list(sd[seeds[0]])):
        if all(key in sd[s] for s in seeds):
            name = {"deepest": "deepest exit (unmodified model)", "ensemble": "ensemble of all exits"}.get(
                key, f"exit {key[4:]}"
            )
            add(f"Self-distillation top-1, {name}", [sd[s][key] for s in seeds], "%")
    gains = [sd[s]["deepest"] - plain[s]["deepest"] for s in seeds]
    add("Deepest-exit gain over plain", gains, "points")
    reductions = [
        100.0 * (sd[s]["deepest"] - plain[s]["deepest"]) / max(100.0 - plain[s]["deepest"], 1e-9) for s in seeds
    ]
    add("Relative error reduction (deepest vs plain)", reductions, "%")
    return {"seeds": seeds, "rows": rows}


def cost_rows(cost: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Overhead rows with their targets and whether they are met."""
    flops = cost["flops"]["flops_ratio"]
    step_bound = TARGETS["step_time_vs_flops"] * flops
    step = cost["train_step"]["median_pair_ratio"]
    mem = cost["peak_memory"]["ratio"]
    inf = cost["inference"]["median_pair_ratio"]
    aa = cost["inference"].get("aa_median_pair_ratio")
    # A latency difference no larger than twice the A/A difference (plain vs a copy of itself) is noise.
    inf_tol = max(0.03, 2 * abs(aa - 1.0)) if aa is not None else 0.03
    return [
        {"row": "FLOPs ratio, training forward (model + exits) / model", "value": flops, "target": "floor", "ok": None},
        {
            "row": "Training-step time ratio sd / plain (median)",
            "value": step,
            "target": f"<= {TARGETS['step_time_vs_flops']:.2f} x FLOPs ratio = {step_bound:.2f}",
            "ok": step <= step_bound,
        },
        {
            "row": "Peak training memory ratio sd / plain (median)",
            "value": mem,
            "target": f"<= {TARGETS['peak_memory_ratio']:.2f}",
            "ok": mem <= TARGETS["peak_memory_ratio"],
        },
        {
            "row": "Inference latency ratio, exits unused (median)",
            "value": inf,
            "target": f"1.00 (+-{inf_tol:.2f}: max(0.03, 2 x A/A))",
            "ok": abs(inf - TARGETS["inference_ratio"]) <= inf_tol,
        },
    ] + (
        []
        if aa is None
        else [{"row": "Inference A/A ratio, plain / plain copy (noise floor)", "value": aa, "target": "-", "ok": None}]
    )


def _fmt(x: float, unit: str) -> str:
    sign = "+" if unit == "points" and x > 0 else ""
    return f"{sign}{x:.2f}"


def render_markdown(acc: Dict[str, Any], cost: Optional[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The Results table (accuracy, then cost) as Markdown."""
    seeds = acc["seeds"]
    lines = [f"### Results: {meta['title']}", ""]
    if acc["rows"]:
        lines.append("| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std | min / max |")
        lines.append("|" + "---|" * (len(seeds) + 3))
    for r in acc["rows"]:
        cells = " | ".join(_fmt(v, r["unit"]) for v in r["per_seed"])
        lines.append(
            f"| {r['row']} ({r['unit']}) | {cells} | {_fmt(r['mean'], r['unit'])} +- {r['std']:.2f} | "
            f"{_fmt(r['min'], r['unit'])} / {_fmt(r['max'], r['unit'])} |"
        )
    if cost is not None:
        lines += ["", "| Cost | value | target | met |", "|---|---|---|---|"]
        for r in cost_rows(cost):
            ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "**no**")
            lines.append(f"| {r['row']} | {r['value']:.3f}x | {r['target']} | {ok} |")
        f, t, m, i = cost["flops"], cost["train_step"], cost["peak_memory"], cost["inference"]
        lines += [
            "",
            f"FLOPs/image: plain {f['plain_gflops_per_image'] * 1e3:.1f} M, exits "
            + ", ".join(f"{g * 1e3:.2f} M" for g in f["exit_gflops_per_image"])
            + f" (mmengine FlopAnalyzer, 1 multiply-add = 1 FLOP). Step time (median of {t['rounds']} ABBA-interleaved "
            f"steps, batch {t['batch_size']}): plain {t['plain_median_s'] * 1e3:.1f} ms, "
            f"sd {t['sd_median_s'] * 1e3:.1f} ms. "
            f"Peak memory (peak-RSS growth in fresh processes, median of {m['repeats']}): plain "
            f"{m['plain_mib']:.0f} MiB, sd {m['sd_mib']:.0f} MiB. Inference (eval, deepest, batch {i['batch_size']}): "
            f"plain {i['plain_median_s'] * 1e3:.1f} ms, sd {i['sd_median_s'] * 1e3:.1f} ms.",
        ]
    lines += ["", meta["recipe"]]
    return "\n".join(lines) + "\n"


def save_json(path: Path, payload: Dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (NaN/inf refused)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            raise ValueError(f"non-finite number in the results: {o}")
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, Path):
            return str(o)
        return o

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2) + "\n")


def _curves(runs: List[Dict[str, Any]], arm: str) -> List[Tuple[List[int], List[float]]]:
    out = []
    for run in runs:
        if run["arm"] != arm or not run["history"]:
            continue
        accs = [exit_accuracies(h) for h in run["history"]]
        if arm == "sd":
            ys = [a.get("deepest", a[_exit_order([k for k in a if k.startswith("exit")])[-1]]) for a in accs]
        else:
            ys = [a["deepest"] for a in accs]
        out.append(([int(h["epoch"]) for h in run["history"]], ys))
    return out


def plot(path: Path, acc: Dict[str, Any], runs: List[Dict[str, Any]], title: str) -> None:
    """Per-exit top-1 (mean, min-max bars) against the plain model, and val top-1 per epoch of both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = {r["row"]: r for r in acc["rows"]}
    plain = rows["Plain model top-1"]
    sd_rows = [r for r in acc["rows"] if r["row"].startswith("Self-distillation top-1")]
    labels = [
        r["row"].split(", ", 1)[1].replace(" (unmodified model)", "").replace(" of all exits", "") for r in sd_rows
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = list(range(len(sd_rows)))
    means = [r["mean"] for r in sd_rows]
    err = [[r["mean"] - r["min"] for r in sd_rows], [r["max"] - r["mean"] for r in sd_rows]]
    ax1.bar(xs, means, yerr=err, capsize=4, color="tab:orange", alpha=0.85, label="self-distillation")
    ax1.axhline(plain["mean"], color="tab:blue", lw=2, label=f"plain model ({plain['mean']:.2f} %)")
    ax1.axhspan(plain["min"], plain["max"], color="tab:blue", alpha=0.15)
    ax1.set_xticks(xs, labels)
    lo = min(min(r["min"] for r in sd_rows), plain["min"])
    ax1.set_ylim(max(0.0, lo - 5), min(100.0, max(max(r["max"] for r in sd_rows), plain["max"]) + 3))
    ax1.set_ylabel("test top-1 (%)")
    ax1.set_title(f"Per-exit top-1 (mean, min/max over {len(acc['seeds'])} seeds)")
    ax1.legend(loc="lower right")
    for arm, color, name in (("plain", "tab:blue", "plain"), ("sd", "tab:orange", "self-distillation, deepest")):
        for i, (ep, ys) in enumerate(_curves(runs, arm)):
            ax2.plot(ep, ys, color=color, marker="o", ms=3, alpha=0.8, label=name if i == 0 else None)
    ax2.set_xlabel("epoch")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_ylabel("validation top-1 (%)")
    ax2.set_title("Training curves (fixed test subset, one line per seed)")
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
