"""Turning benchmark runs into the Results table (Markdown + JSON) and the figure (matplotlib)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tools.bench.arms import BASELINE_ARM

#: Issue 12's target: training-step time of a self-distillation arm at most 1.10x plain cross-entropy's.
STEP_TIME_TARGET = 1.10
_EXIT_KEY = re.compile(r"exit[_\-\s]?(\d+)", re.IGNORECASE)


def exit_accuracies(metrics: Dict[str, float]) -> Dict[str, float]:
    """Top-1 (%) keyed 'exit1'..'exitK', 'deepest', 'ensemble' from a metric dict: keys naming ``exit<k>``,
    ``deepest`` or ``ensemble`` (with ``top1`` or no top-k), or MMPretrain's plain ``accuracy/top1`` (deepest)."""
    out: Dict[str, float] = {}
    for key, value in metrics.items():
        low = key.lower()
        if "top5" in low or "loss" in low or "calibrated" in low or key == "epoch":
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


def _exit_order(keys: Sequence[str]) -> List[str]:
    exits = sorted((k for k in keys if k.startswith("exit")), key=lambda k: int(k[4:]))
    return exits + [k for k in ("deepest", "ensemble") if k in keys]


def _final(runs: List[Dict[str, Any]], arm: str) -> Dict[int, Dict[str, float]]:
    """Final top-1 per seed of an arm's finished runs, keyed exit1.., deepest, ensemble."""
    out = {}
    for run in runs:
        if run["arm"] == arm and (run.get("test") or run.get("history")):
            acc = exit_accuracies(run.get("test") or run["history"][-1])
            if "deepest" not in acc:
                raise ValueError(f"run {arm} seed {run['seed']} reported no top-1 (metrics: {sorted(acc)}).")
            if not any(k.startswith("exit") for k in acc):
                acc.pop("ensemble", None)  # no exits: the "ensemble" is the deepest classifier alone
            out[run["seed"]] = acc
    return out


def _stats(values: Sequence[float]) -> Dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return dict(per_seed=list(values), mean=statistics.fmean(values), std=std, min=min(values), max=max(values))


def arm_results(runs: List[Dict[str, Any]], arms: Sequence[str]) -> Dict[str, Any]:
    """Per-arm top-1 (per exit, deepest, ensemble) over the seeds every arm finished, and the change vs CE: the gain
    and the relative error reduction ``(err_ce - err_arm) / err_ce`` per seed (deepest classifier, ensemble)."""
    finals = {a: _final(runs, a) for a in arms}
    seeds = sorted(set.intersection(*(set(f) for f in finals.values()))) if finals else []
    out: Dict[str, Any] = {"seeds": seeds, "arms": []}
    if not seeds:
        return out
    base = finals.get(BASELINE_ARM)
    for arm in arms:
        per = finals[arm]
        keys = [k for k in _exit_order(list(per[seeds[0]])) if all(k in per[s] for s in seeds)]
        row: Dict[str, Any] = {"arm": arm, "top1": {k: _stats([per[s][k] for s in seeds]) for k in keys}}
        for k in ("deepest", "ensemble") if base is not None else ():
            if k in row["top1"]:
                gain = [per[s][k] - base[s]["deepest"] for s in seeds]
                rer = [100.0 * g / max(100.0 - base[s]["deepest"], 1e-9) for g, s in zip(gain, seeds)]
                row[f"{k}_gain_vs_ce"], row[f"{k}_error_reduction_vs_ce"] = _stats(gain), _stats(rer)
        out["arms"].append(row)
    return out


def _pm(st: Dict[str, Any], signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    seeds = ", ".join(fmt.format(v) for v in st["per_seed"])
    return f"{fmt.format(st['mean'])} ± {st['std']:.2f} ({seeds})"


def render_markdown(acc: Dict[str, Any], cost: Optional[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The Results tables (accuracy per arm, then cost per arm) as Markdown."""
    lines = [f"### Results: {meta['title']}", ""]
    if acc["arms"]:
        lines += [
            f"Top-1 (%) on the test set, mean ± std over seeds {acc['seeds']} (per seed in brackets); "
            "relative error reduction vs CE of the deepest classifier (the unmodified model).",
            "",
            "| arm | deepest top-1 | ensemble top-1 | per exit (mean) | Δ deepest vs CE (points) | "
            "rel. error reduction vs CE (%) |",
            "|---|---|---|---|---|---|",
        ]
        for row in acc["arms"]:
            t = row["top1"]
            exits = " / ".join(f"{t[k]['mean']:.2f}" for k in t if k.startswith("exit")) or "-"
            ens = _pm(t["ensemble"]) if "ensemble" in t else "-"
            gain = _pm(row["deepest_gain_vs_ce"], True) if "deepest_gain_vs_ce" in row else "-"
            rer = _pm(row["deepest_error_reduction_vs_ce"], True) if "deepest_error_reduction_vs_ce" in row else "-"
            lines.append(f"| {row['arm']} | {_pm(t['deepest'])} | {ens} | {exits} | {gain} | {rer} |")
    if cost is not None:
        t, m = cost["train_step"], cost["peak_memory"]
        lines += [
            "",
            f"Cost vs CE, in one process: training-step time (median of {t['rounds']} per-round ratios, all arms "
            f"interleaved on the same batches of {t['batch_size']}), peak training memory (peak-RSS growth in fresh "
            f"processes, median of {m['repeats']}), training-forward FLOPs (mmengine FlopAnalyzer), inference "
            "latency of the deployed (deepest) classifier, exits unused (interleaved, eval mode). "
            f"Target: step time <= {STEP_TIME_TARGET:.2f}x.",
            "",
            "| arm | step time | (median step) | peak memory | FLOPs | inference latency |",
            "|---|---|---|---|---|---|",
        ]
        ratios = [cost[k]["ratio_vs_ce"] for k in ("train_step", "peak_memory", "flops", "inference")]
        for arm in t["ratio_vs_ce"]:
            step, mem, flops, infer = (r[arm] for r in ratios)
            ms = t["median_s"][arm] * 1e3
            lines.append(f"| {arm} | {step:.3f}x | {ms:.1f} ms | {mem:.3f}x | {flops:.3f}x | {infer:.3f}x |")
    lines += ["", meta["recipe"]]
    return "\n".join(lines) + "\n"


def save_json(path: Path, payload: Dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (NaN/inf refused with a ValueError; paths as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")


def plot(path: Path, acc: Dict[str, Any], runs: List[Dict[str, Any]], title: str) -> None:
    """Deepest and ensemble top-1 per arm (mean, min-max bars) and the validation curves of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = acc["arms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    xs = list(range(len(rows)))
    for offset, key, color in ((-0.2, "deepest", "tab:blue"), (0.2, "ensemble", "tab:orange")):
        pts = [(x + offset, r["top1"][key]) for x, r in zip(xs, rows) if key in r["top1"]]
        if pts:
            err = [[st["mean"] - st["min"] for _, st in pts], [st["max"] - st["mean"] for _, st in pts]]
            means = [st["mean"] for _, st in pts]
            ax1.bar([x for x, _ in pts], means, width=0.4, yerr=err, capsize=3, color=color, label=key)
    lo = min(r["top1"]["deepest"]["min"] for r in rows)
    hi = max(max(st["max"] for st in r["top1"].values()) for r in rows)
    ax1.set(ylim=(max(0.0, lo - 4), min(100.0, hi + 2)), ylabel="test top-1 (%)")
    ax1.set_title(f"Top-1 per arm (mean, min/max over {len(acc['seeds'])} seeds)")
    ax1.set_xticks(xs, [r["arm"] for r in rows], rotation=30)
    ax1.legend(loc="lower right")
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        seed_runs = [run for run in runs if run["arm"] == row["arm"] and run.get("history")]
        for j, run in enumerate(seed_runs):
            ys = [exit_accuracies(h).get("deepest") for h in run["history"]]
            kw = dict(color=colors(i % 10), marker="o", ms=3, alpha=0.8, label=row["arm"] if j == 0 else None)
            ax2.plot([int(h["epoch"]) for h in run["history"]], ys, **kw)
    ax2.set(xlabel="epoch", ylabel="validation top-1, deepest (%)")
    ax2.set_title("Training curves (fixed validation subset, one line per seed)")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.legend(loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
