"""Soak test of early exit under concurrent load: many threads call one model for a bounded time.

Threads call one ``EarlyExitModel``, then one ``OnnxCascade``, and the plain model each runs against; every answer is
compared bitwise with the same object's sequential answer. A measurement, not a timed assertion; docs/reliability.md.

    python -m tools.soak_early_exit --threads 8 --seconds 20 --rounds 2 --json soak.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

import sd_plugin
from sd_plugin._provenance import command_line, provenance
from sd_plugin.core.naming import exit_name
from sd_plugin.deploy import EarlyExitModel, ExitPolicy, OnnxCascade, export_cascade, export_onnx
from tools.bench.cost import proc_status_mib

MIN_BATCH, MAX_BATCH = 1, 32
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
EXIT_QUANTILES = (0.7, 0.6, 0.5)  # thresholds at these quantiles of each exit's confidence: the exits mix
MAX_MESSAGES = 3  # error messages kept per variant
_COUNTS = ("calls", "images", "errors", "mismatches")  # what a SoakResult counts
PAGE_TITLE = "# Early exit under concurrent load"
PAGE_MODEL = (
    "Model: timm's `test_resnet` wrapped by sd_plugin (random weights) at 32 px, three exits and the deepest "
    "classifier; thresholds at quantiles of each exit's confidence so that answers leave at every exit. Each "
    "variant runs for the stated time with all threads calling one shared object; every answer is compared with "
    "that object's sequential answer."
)


@dataclass
class Variant:
    """One callable under test: ``call(batch)`` gives an answer, ``same(a, b)`` compares two answers."""

    name: str
    call: Callable[[torch.Tensor], Any]
    same: Callable[[Any, Any], bool]
    expected: List[Any] = field(default_factory=list)


@dataclass
class SoakResult:
    """What one variant did under load (all rounds together)."""

    name: str
    calls: int = 0
    images: int = 0
    errors: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    latencies: List[float] = field(default_factory=list)
    first_errors: List[str] = field(default_factory=list)

    def add(self, other: SoakResult) -> None:
        """Count ``other``'s calls, time and latencies in this result too."""
        for name in _COUNTS + ("seconds",):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies += other.latencies
        self.first_errors += other.first_errors[: max(0, MAX_MESSAGES - len(self.first_errors))]

    def summary(self) -> Dict[str, Any]:
        lat = sorted(self.latencies)
        pick = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
        rate = self.images / self.seconds if self.seconds else 0.0
        counts = {k: getattr(self, k) for k in _COUNTS}
        out = dict(name=self.name, **counts, images_per_s=rate, p50_ms=pick(0.5), p99_ms=pick(0.99))
        return {**out, "first_errors": self.first_errors}


def build_model(seed: int = 0) -> nn.Module:
    """A small self-distilled timm model (``test_resnet``, 3 exits) whose exits answer different samples."""
    import timm

    torch.manual_seed(seed)
    model = sd_plugin.wrap(timm.create_model("test_resnet", num_classes=NUM_CLASSES), input_size=IMAGE_SHAPE)
    with torch.no_grad():
        for p in model.sd_exits.parameters():  # untrained exits: spread their confidences
            p.add_(0.2 * torch.randn_like(p))
        model.train()
        model(torch.randn(16, *IMAGE_SHAPE))  # batch-norm statistics
    return model.eval()


def make_batches(count: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(MIN_BATCH, MAX_BATCH + 1, (count,), generator=g).tolist()
    return [torch.randn(n, *IMAGE_SHAPE, generator=g) for n in sizes]


def policy_for(model: nn.Module, x: torch.Tensor) -> ExitPolicy:
    from sd_plugin.deploy import collect_exit_logits

    conf = collect_exit_logits(model, [(x, torch.zeros(len(x)))]).logits[:-1].softmax(-1).max(-1).values
    return ExitPolicy([float(c.quantile(q)) for c, q in zip(conf, EXIT_QUANTILES)])


def _torch_call(fn: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    def call(x: torch.Tensor) -> Any:
        with torch.inference_mode():  # grad mode is per thread
            return fn(x)

    return call


def _same_answer(equal: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """Two early-exit answers (logits and exit index) are the same."""
    return lambda a, b: equal(a.logits, b.logits) and equal(a.exit, b.exit)


def build_variants(model: nn.Module, policy: ExitPolicy, folder: Path, onnx: bool = True) -> List[Variant]:
    """The plain model and early exit, in PyTorch and (``onnx``) on ONNX Runtime."""
    plain = sd_plugin.unwrap(copy.deepcopy(model)).eval()
    ee = EarlyExitModel(model, policy).eval()
    variants = [
        Variant("plain (torch)", _torch_call(plain), torch.equal),
        Variant("EarlyExitModel", _torch_call(ee), _same_answer(torch.equal)),
    ]
    if onnx:
        import onnxruntime as ort

        example = torch.randn(4, *IMAGE_SHAPE)
        export_onnx(plain, example, folder / "plain.onnx")
        session = ort.InferenceSession(str(folder / "plain.onnx"), providers=["CPUExecutionProvider"])
        cascade = OnnxCascade(export_cascade(model, example, folder / "cascade", policy))
        variants += [
            Variant("plain (ONNX)", lambda x: session.run(None, {"images": x.numpy()})[0], np.array_equal),
            Variant("OnnxCascade", lambda x: cascade(x.numpy()), _same_answer(np.array_equal)),
        ]
    return variants


def _run_threads(variant: Variant, batches: Sequence[torch.Tensor], threads: int, seconds: float) -> SoakResult:
    """``threads`` threads call ``variant`` for ``seconds``; thread t takes batches t, t + threads, ... in turn."""
    per_thread = [SoakResult(variant.name) for _ in range(threads)]  # summed at the end: no lock while counting
    start_line = threading.Barrier(threads + 1)
    stop = threading.Event()

    def worker(t: int) -> None:
        mine, i = per_thread[t], t
        start_line.wait()
        while not stop.is_set():
            x = batches[i % len(batches)]
            began = time.perf_counter()
            try:
                answer = variant.call(x)
            except Exception as e:  # counted and reported: the soak must see every failure
                mine.errors += 1
                mine.first_errors.append(f"{type(e).__name__}: {e}")
            else:
                mine.latencies.append(time.perf_counter() - began)
                mine.images += len(x)
                mine.mismatches += not variant.same(answer, variant.expected[i % len(batches)])
            mine.calls += 1
            i += threads

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    start_line.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for th in pool:
        th.join()
    result = SoakResult(variant.name, seconds=time.perf_counter() - began)
    for mine in per_thread:
        result.add(mine)
    return result


def soak(
    variants: Sequence[Variant],
    batches: Sequence[torch.Tensor],
    threads: int = 8,
    seconds: float = 10.0,
    rounds: int = 1,
    warmup_seconds: float = 1.0,
) -> Dict[str, Any]:
    """Sequential answers first, a warm-up under load, then ``rounds`` rounds of every variant under load; per-variant
    summaries and the resident memory after the warm-up, at the end and at its peak."""
    if threads < 1 or seconds <= 0 or rounds < 1 or warmup_seconds < 0:
        raise ValueError(
            f"need threads >= 1, seconds > 0, rounds >= 1 and warmup_seconds >= 0; got {threads}, {seconds}, "
            f"{rounds}, {warmup_seconds}."
        )
    for v in variants:
        v.expected = [v.call(x) for x in batches]
    warmup = [_run_threads(v, batches, threads, warmup_seconds) for v in variants] if warmup_seconds else []
    samples = [proc_status_mib("VmRSS")]  # after the warm-up, then after every variant's run
    totals = {v.name: SoakResult(v.name) for v in variants}
    for _ in range(rounds):
        for v in variants:
            totals[v.name].add(_run_threads(v, batches, threads, seconds / rounds))
            samples.append(proc_status_mib("VmRSS"))
    known = [s for s in samples if s is not None]
    run = dict(threads=threads, seconds=seconds, rounds=rounds, batches=len(batches))
    machine = dict(torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), load_average=list(os.getloadavg()))
    end, peak = (known[-1], max(known)) if known else (None, None)
    rss = dict(rss_after_warmup_mib=samples[0], rss_end_mib=end, rss_peak_mib=peak)
    return {
        **run,
        "batch_sizes": sorted({len(b) for b in batches}),
        **machine,
        "warmup_errors": sum(w.errors + w.mismatches for w in warmup),
        "variants": [totals[v.name].summary() for v in variants],
        **rss,
        "rss_samples_mib": [round(x, 1) for x in known],
    }


def report_parts(report: Dict[str, Any]) -> List[str]:
    """The report's paragraphs: the run, the table, memory, and where early exit answered."""
    load = ", ".join(f"{x:.2f}" for x in report["load_average"])
    head = (
        f"{report['threads']} threads, {report['seconds']:g} s per variant in {report['rounds']} round(s), "
        f"{report['batches']} batches of {MIN_BATCH}-{MAX_BATCH} images, torch threads {report['torch_threads']}, "
        f"{report['cpus']} CPUs, load average at the end {load}"
    )
    rows = [
        "| variant | calls | errors | differ from sequential | images/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        rows.append(
            f"| {v['name']} | {v['calls']} | {v['errors']} | {v['mismatches']} | {v['images_per_s']:.0f} | "
            f"{v['p50_ms']:.2f} | {v['p99_ms']:.2f} |"
        )
    start, end, peak = report["rss_after_warmup_mib"], report["rss_end_mib"], report["rss_peak_mib"]
    memory = (
        f"resident memory after warm-up {start:.1f} MiB, at the end {end:.1f} MiB (growth {end - start:+.1f} MiB), "
        f"peak {peak:.1f} MiB"
        if None not in (start, end, peak)
        else "resident memory: not available on this system"
    )
    shares = report.get("exit_shares", {})
    shares = ", ".join(f"{exit_name(int(k) - 1, len(shares) - 1)}: {100 * v:.0f}%" for k, v in shares.items())
    return [head, "\n".join(rows), memory, f"early exit answers by exit: {shares}"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=8, help="threads calling each model at once")
    p.add_argument("--seconds", type=float, default=20.0, help="time under load per variant (all rounds)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; every variant runs once per round")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds under load per variant before measuring")
    p.add_argument("--batches", type=int, default=64, help="size of the pool of batches (sizes 1-32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-onnx", action="store_true", help="PyTorch only (no ONNX Runtime variants)")
    p.add_argument("--json", default=None, help="write the report here too")
    p.add_argument("--md", default=None, help="write a results page (with command, versions, hardware, date) here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    model = build_model(args.seed)
    batches = make_batches(args.batches, args.seed + 1)
    with torch.no_grad():
        policy = policy_for(model, torch.cat(batches)[:256])
    with tempfile.TemporaryDirectory() as folder:
        variants = build_variants(model, policy, Path(folder), onnx=not args.no_onnx)
        report = soak(variants, batches, args.threads, args.seconds, args.rounds, args.warmup)
    answers = next(v.expected for v in variants if v.name == "EarlyExitModel")
    exits = torch.cat([a.exit for a in answers])
    report["exit_shares"] = {int(k): round(float((exits == k).float().mean()), 3) for k in exits.unique()}
    report["command"] = command_line("tools.soak_early_exit", argv)
    parts = report_parts(report)
    print("\n".join(parts), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        page = [PAGE_TITLE, provenance(report["command"]), PAGE_MODEL, *parts]
        Path(args.md).write_text("\n\n".join(page) + "\n")
    return report


if __name__ == "__main__":
    main()
