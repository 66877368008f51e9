"""The per-exit report as Markdown tables and a plot (matplotlib, when installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .._provenance import provenance
from ..deploy.speed import BATCHES

__all__ = ["markdown", "plot", "latency_plot_path"]

MEGA = 1e6
NAMES = {"eager": "eager", "onnx": "ONNX"}
PLOT_SIZE = (6, 4)
PLOT_DPI = 110


def _num(value: Optional[float], fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def _exit_table(report: Dict[str, Any]) -> List[str]:
    timed = "timing" in report
    head = "| exit | top-1 | top-5 | params (M) | MFLOPs | FLOPs % |" + (
        " latency b1 (ms) | latency b32 (ms) |" * timed
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["exits"]:
        frac = None if r["flops_fraction"] is None else 100 * r["flops_fraction"]
        line = (
            f"| {r['exit']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['params'] / MEGA:.3f} | "
            f"{_num(r['flops'], '.1f', MEGA)} | {_num(frac, '.1f')} |"
        )
        if timed:
            line += f" {r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.1f} |"
        lines.append(line)
    return lines


def _backends(report: Dict[str, Any]) -> List[str]:
    """The timed backends of the operating points: eager PyTorch, and ONNX Runtime unless it was not timed."""
    if "timing" not in report:
        return []
    return ["eager"] + ["onnx"] * (report["timing"]["onnx_not_timed"] is None)


def _speed_cells(p: Dict[str, Any], backends: List[str]) -> str:
    if not backends:
        return ""
    cells = [f"{p[f'{k}_speedup_{b}']:.2f}x ({p[f'{k}_aa_{b}']:.2f})" for k in backends for b in BATCHES]
    ratio = p["measured_over_ideal"]
    cells += [", ".join("-" if ratio is None else f"{ratio[f'{k}_{b}']:.2f}" for b in BATCHES) for k in backends]
    return "".join(f" {c} |" for c in cells)


def _points_table(report: Dict[str, Any]) -> List[str]:
    backends = _backends(report)
    head = "| method | max drop | thresholds | top-1 (deepest) | exit shares | avg MFLOPs (% of plain) | FLOPs-ideal |"
    head += "".join(f" {NAMES[k]} {b} (A/A) |" for k in backends for b in BATCHES)
    head += "".join(f" {NAMES[k]} ÷ ideal ({', '.join(BATCHES)}) |" for k in backends)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    plain = report["exits"][-2]["flops"]
    for p in report["operating_points"]:
        if "error" in p:
            lines.append(f"| {p['method']} | {p['max_drop']} | not reached: {p['error']} |")
            continue
        h = p["test"]
        ts = ", ".join("-" if t is None else f"{t:.3f}" for t in p["thresholds"])
        shares = ", ".join(f"{100 * s:.0f}%" for s in h["exit_share"].values())
        cost = "-" if h["flops"] is None else f"{h['flops'] / MEGA:.1f} ({100 * h['flops'] / plain:.0f}%)"
        line = (
            f"| {p['method']} | {p['max_drop']} | {ts} | {h['top1']:.2f} ({h['deepest_top1']:.2f}) | {shares} | "
            f"{cost} | {_num(p['ideal_speedup'], '.2f')}x |"
        )
        lines.append(line + _speed_cells(p, backends))
    return lines


def _speed_note(report: Dict[str, Any]) -> List[str]:
    t = report.get("timing")
    if t is None:
        return []
    onnx = (
        "ONNX: the plain model's ONNX export against the ONNX cascade, ONNX Runtime on the CPU"
        if t["onnx_not_timed"] is None
        else f"ONNX Runtime not timed: {t['onnx_not_timed']}"
    )
    return [
        "",
        "Speed-ups: the plain model's median time over early exit's at batch 1 and 32, in parentheses the plain "
        f"model's over its own (A/A: the noise floor). {onnx}. ÷ ideal: measured over FLOPs-ideal (the ideal is "
        "for the exit shares of all test images, the timing is on the first ones).",
    ]


def _baseline_table(report: Dict[str, Any]) -> List[str]:
    """Plain models beside the exits: accuracy and cost, then every timed point on the accuracy-latency plane."""
    rows = report.get("baselines")
    if not rows:
        return []
    lines = ["", "Plain models, scored on the same test images:", ""]
    lines += ["| plain model | top-1 | top-5 | params (M) | MFLOPs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['params'] / MEGA:.3f} | "
            f"{_num(r['flops'], '.1f', MEGA)} |"
        )
    if "frontier" not in report:
        return lines
    from ._baselines import plane_points

    best = {b: set(report["frontier"][b]) for b in BATCHES}
    lines += [
        "",
        "Accuracy against latency (eager PyTorch, timed in the same interleaved rounds); frontier: no other point "
        "is at least as accurate and as fast:",
        "",
        "| point | kind | top-1 | latency b1 (ms) | latency b32 (ms) | on the frontier at |",
        "|---|---|---|---|---|---|",
    ]
    for q in plane_points(report):
        on = ", ".join(b for b in BATCHES if q["label"] in best[b]) or "-"
        lines.append(
            f"| {q['label']} | {q['kind']} | {q['top1']:.2f} | {q['latency_b1_ms']:.2f} | "
            f"{q['latency_b32_ms']:.1f} | {on} |"
        )
    return lines


def markdown(report: Dict[str, Any]) -> str:
    """The report's tables: one row per exit (and the ensemble), then the calibrated operating points."""
    lines = [f"## Exits of `{report['model']}` ({report['num_samples']} images of {report['data']})", ""]
    if "versions" in report:
        lines += [provenance(report["command"], report), ""]
    lines += _exit_table(report)
    lines += ["", f"ensemble: {report['ensemble']}."]
    if not report["flops_counted"]:
        lines.append("FLOPs not counted: mmengine's FlopAnalyzer is not installed (pip install mmengine).")
    if "timing" in report:
        t = report["timing"]
        lines.append(
            f"Latency: medians of {t['repeats']} interleaved rounds on {t['device']} ({t['torch_threads']} torch "
            f"threads{', channels-last memory format' if t.get('memory_format') == 'channels_last' else ''}); batch 1 "
            f"is the time per image over {t['b1_images']} images timed one by one."
        )
    fit = report.get("calibrated_ensemble")
    if fit is not None:
        weights = ", ".join(f"{w:.3f}" for w in fit["weights"])
        lines.append(
            f"Calibrated ensemble (weights fitted on the calibration images; {fit['chosen']} chosen by cross-"
            f"validation): top-1 {fit['top1']:.2f}, top-5 {fit['top5']:.2f}, weights {weights}."
        )
    if report["operating_points"]:
        lines += [
            "",
            f"Early exit, thresholds calibrated on {report['calib_data']} ({report['calib_samples']} images), every "
            f"figure below measured on the test images ({report['num_samples']}); calibration methods: "
            f"{', '.join(report['calib_methods'])}:",
            "",
        ]
        lines += _points_table(report) + _speed_note(report)
    lines += _baseline_table(report)
    return "\n".join(lines) + "\n"


def plot(report: Dict[str, Any], path: Path) -> Optional[str]:
    """Accuracy against FLOPs per exit, the ensemble, the threshold sweep and the operating points.

    Returns ``None`` when written, else why not (no matplotlib, no FLOPs).
    """
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: pip install 'sd-plugin[analysis]'"
    if not report["flops_counted"]:
        return "FLOPs were not counted: pip install mmengine"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    rows = [r for r in report["exits"] if r["number"] is not None]
    ax.plot([r["flops"] / MEGA for r in rows], [r["top1"] for r in rows], "o-", label="single exit")
    for r in rows:
        ax.annotate(r["exit"], (r["flops"] / MEGA, r["top1"]), textcoords="offset points", xytext=(4, -10))
    ens = report["exits"][-1]
    ax.plot([ens["flops"] / MEGA], [ens["top1"]], "s", label="ensemble")
    curve = report["early_exit_curve"]
    ax.plot([c["cost"] / MEGA for c in curve], [c["top1"] for c in curve], ".--", label="early exit (threshold sweep)")
    for p in report["operating_points"]:
        if "error" in p:
            continue
        h = p["test"]
        label = f"{p['method']}, max drop {p['max_drop']} (test)"
        ax.plot([h["flops"] / MEGA], [h["top1"]], "*", ms=12, label=label)
    ax.set_xlabel("MFLOPs per image (average for early exit)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{report['model']}: accuracy vs compute per exit")
    _finish(ax, fig, path, plt)
    if "frontier" in report:
        _latency_plot(report, latency_plot_path(path), plt)
    return None


def latency_plot_path(path: Path) -> Path:
    """Where :func:`plot` draws accuracy against latency, beside the accuracy-against-FLOPs plot at ``path``."""
    return path.with_name(f"{path.stem}_latency{path.suffix}")


def _latency_plot(report: Dict[str, Any], path: Path, plt: Any) -> None:
    """Top-1 against measured latency at batch 1 and 32: single exits, early exit and the plain models."""
    from ._baselines import KINDS, plane_points

    points = plane_points(report)
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(PLOT_SIZE[0] * len(BATCHES), PLOT_SIZE[1]))
    for ax, b in zip(axes, BATCHES):
        key = f"latency_{b}_ms"
        for kind, style in zip(KINDS, ("o-", "s-", "D", "*")):
            mine = [q for q in points if q["kind"] == kind]  # exits in their order, plain models by latency
            mine = sorted(mine, key=lambda q: q[key]) if kind == KINDS[0] else mine
            if mine:
                ax.plot([q[key] for q in mine], [q["top1"] for q in mine], style, ms=8, label=kind)
                for q in mine:
                    ax.annotate(
                        q["label"], (q[key], q["top1"]), textcoords="offset points", xytext=(4, -10), fontsize=6
                    )
        ax.set_xlabel(f"latency at {b} (ms{' per image' if b == 'b1' else ' per batch of 32'})")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{report['model']}: accuracy vs latency, {b}")
    _finish(axes, fig, path, plt)


def _finish(axes: Any, fig: Any, path: Path, plt: Any) -> None:
    """Grid and legend on every axis, then the figure written to ``path`` (atomically) and closed."""
    from .._io import atomic_write_path

    for ax in getattr(axes, "flat", [axes]):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    plt.close(fig)
