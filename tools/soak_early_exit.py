"""Soak test of early exit under concurrent load: many threads call one model for a bounded time.

N threads (default 8) call one :class:`~sd_plugin.deploy.EarlyExitModel`, then one
:class:`~sd_plugin.deploy.OnnxCascade`, and the plain model each runs against (the unwrapped timm model in
PyTorch; its ONNX export on ONNX Runtime), on a fixed pool of batches of mixed sizes (1 to 32). Every answer is
compared with the answer the same object gave to the same batch sequentially (bitwise); exceptions are counted.
Reported per variant: calls, errors, answers that differ, images per second, p50/p99 latency per call, and the
process's resident memory (VmRSS) after a warm-up against its end and its peak.

Resident memory under many threads grows while glibc's per-thread malloc arenas fill, for the plain model as for
early exit, and levels off; ``MALLOC_ARENA_MAX=2`` reaches the level sooner.

The variants run one after another in every round (``--rounds``), so slow drifts of a shared machine touch all
of them. This is a measurement, not a timed assertion (``tests/deploy/test_soak_early_exit.py`` runs it briefly
and checks only errors and answers).

Example:
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

__all__ = ["SoakResult", "build_model", "soak", "main"]

MIN_BATCH, MAX_BATCH = 1, 32
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
EXIT_QUANTILES = (0.7, 0.6, 0.5)  # thresholds at these quantiles of each exit's confidence: the exits mix
MiB = 1024 * 1024
MAX_MESSAGES = 3  # error messages kept per variant
PAGE_TITLE = "# Early exit under concurrent load"
PAGE_MODEL = (
    "Model: timm's `test_resnet` wrapped by sd_plugin (random weights) at 32 px, three exits and the deepest "
    "classifier; thresholds at quantiles of each exit's confidence so that answers leave at every exit. Each "
    "variant runs for the stated time with all threads calling one shared object; every answer is compared with "
    "that object's sequential answer."
)


def rss_bytes() -> Optional[int]:
    """Resident memory of this process (Linux ``/proc/self/status``; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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

    def summary(self) -> Dict[str, Any]:
        lat = sorted(self.latencies)
        pick = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
        return dict(
            name=self.name,
            calls=self.calls,
            images=self.images,
            errors=self.errors,
            mismatches=self.mismatches,
            images_per_s=self.images / self.seconds if self.seconds else 0.0,
            p50_ms=pick(0.5),
            p99_ms=pick(0.99),
            first_errors=self.first_errors,
        )


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


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


def _same_exit_answer(a: Any, b: Any) -> bool:
    return torch.equal(a.logits, b.logits) and torch.equal(a.exit, b.exit)


def _same_cascade_answer(a: Any, b: Any) -> bool:
    return np.array_equal(a.logits, b.logits) and np.array_equal(a.exit, b.exit)


def build_variants(model: nn.Module, policy: ExitPolicy, folder: Path, onnx: bool = True) -> List[Variant]:
    """The plain model and early exit, in PyTorch and (``onnx``) on ONNX Runtime."""
    plain = sd_plugin.unwrap(copy.deepcopy(model)).eval()
    ee = EarlyExitModel(model, policy).eval()
    variants = [
        Variant("plain (torch)", _torch_call(plain), _same_tensor),
        Variant("EarlyExitModel", _torch_call(ee), _same_exit_answer),
    ]
    if onnx:
        import onnxruntime as ort

        example = torch.randn(4, *IMAGE_SHAPE)
        export_onnx(plain, example, folder / "plain.onnx")
        session = ort.InferenceSession(str(folder / "plain.onnx"), providers=["CPUExecutionProvider"])
        cascade = OnnxCascade(export_cascade(model, example, folder / "cascade", policy))
        variants += [
            Variant("plain (ONNX)", lambda x: session.run(None, {"images": x.numpy()})[0], np.array_equal),
            Variant("OnnxCascade", lambda x: cascade(x.numpy()), _same_cascade_answer),
        ]
    return variants


def _run_threads(variant: Variant, batches: Sequence[torch.Tensor], threads: int, seconds: float) -> SoakResult:
    """``threads`` threads call ``variant`` for ``seconds``; thread t takes batches t, t + threads, ... in turn."""
    result = SoakResult(variant.name)
    lock = threading.Lock()
    start_line = threading.Barrier(threads + 1)
    stop = threading.Event()

    def worker(t: int) -> None:
        calls = images = errors = mismatches = 0
        latencies: List[float] = []
        messages: List[str] = []
        i = t
        start_line.wait()
        while not stop.is_set():
            x = batches[i % len(batches)]
            began = time.perf_counter()
            try:
                answer = variant.call(x)
            except Exception as e:  # counted and reported: the soak must see every failure
                errors += 1
                messages.append(f"{type(e).__name__}: {e}")
            else:
                latencies.append(time.perf_counter() - began)
                images += len(x)
                mismatches += not variant.same(answer, variant.expected[i % len(batches)])
            calls += 1
            i += threads
        with lock:
            result.calls += calls
            result.images += images
            result.errors += errors
            result.mismatches += mismatches
            result.latencies += latencies
            result.first_errors += messages[: max(0, MAX_MESSAGES - len(result.first_errors))]

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    start_line.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for th in pool:
        th.join()
    result.seconds = time.perf_counter() - began
    return result


def soak(
    variants: Sequence[Variant],
    batches: Sequence[torch.Tensor],
    threads: int = 8,
    seconds: float = 10.0,
    rounds: int = 1,
    warmup_seconds: float = 1.0,
) -> Dict[str, Any]:
    """Sequential answers first, a warm-up under load, then ``rounds`` rounds of every variant under load.

    Returns per-variant summaries and the resident memory after the warm-up, at the end and at its peak.
    """
    if threads < 1 or seconds <= 0 or rounds < 1 or warmup_seconds < 0:
        raise ValueError(
            f"need threads >= 1, seconds > 0, rounds >= 1 and warmup_seconds >= 0; got {threads}, {seconds}, "
            f"{rounds}, {warmup_seconds}."
        )
    for v in variants:
        v.expected = [v.call(x) for x in batches]
    warmup = {v.name: _run_threads(v, batches, threads, warmup_seconds) for v in variants} if warmup_seconds else {}
    rss_after_warmup = rss_bytes()
    samples = [rss_after_warmup]
    totals = {v.name: SoakResult(v.name) for v in variants}
    for _ in range(rounds):
        for v in variants:
            r = _run_threads(v, batches, threads, seconds / rounds)
            t = totals[v.name]
            t.calls, t.images, t.errors = t.calls + r.calls, t.images + r.images, t.errors + r.errors
            t.mismatches += r.mismatches
            t.seconds += r.seconds
            t.latencies += r.latencies
            t.first_errors += r.first_errors[: max(0, MAX_MESSAGES - len(t.first_errors))]
            samples.append(rss_bytes())
    known = [s for s in samples if s is not None]
    return dict(
        threads=threads,
        seconds=seconds,
        rounds=rounds,
        batches=len(batches),
        batch_sizes=sorted({len(b) for b in batches}),
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        load_average=list(os.getloadavg()),
        warmup_errors=sum(w.errors + w.mismatches for w in warmup.values()),
        variants=[totals[v.name].summary() for v in variants],
        rss_after_warmup_mib=rss_after_warmup / MiB if rss_after_warmup else None,
        rss_end_mib=known[-1] / MiB if known else None,
        rss_peak_mib=max(known) / MiB if known else None,
        rss_samples_mib=[round(x / MiB, 1) for x in known],  # after the warm-up, then after every variant's run
    )


def format_report(report: Dict[str, Any]) -> str:
    rows = [
        "| variant | calls | errors | differ from sequential | images/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        rows.append(
            f"| {v['name']} | {v['calls']} | {v['errors']} | {v['mismatches']} | {v['images_per_s']:.0f} | "
            f"{v['p50_ms']:.2f} | {v['p99_ms']:.2f} |"
        )
    rss = report["rss_after_warmup_mib"], report["rss_end_mib"], report["rss_peak_mib"]
    memory = (
        f"resident memory after warm-up {rss[0]:.1f} MiB, at the end {rss[1]:.1f} MiB "
        f"(growth {rss[1] - rss[0]:+.1f} MiB), peak {rss[2]:.1f} MiB"
        if None not in rss
        else "resident memory: not available on this system"
    )
    load = ", ".join(f"{x:.2f}" for x in report["load_average"])
    head = (
        f"{report['threads']} threads, {report['seconds']:g} s per variant in {report['rounds']} round(s), "
        f"{report['batches']} batches of {MIN_BATCH}-{MAX_BATCH} images, torch threads {report['torch_threads']}, "
        f"{report['cpus']} CPUs, load average at the end {load}"
    )
    shares = report.get("exit_shares", {})
    shares = ", ".join(f"{exit_name(int(k) - 1, len(shares) - 1)}: {100 * v:.0f}%" for k, v in shares.items())
    return "\n".join([head, *rows, memory, f"early exit answers by exit: {shares}"])


def _paragraphs(text: str) -> str:
    """The report as Markdown: the heading line and the lines after the table as paragraphs of their own."""
    lines = text.split("\n")
    out = [lines[0], ""]
    for line in lines[1:]:
        if not line.startswith("|") and out[-1].startswith("|"):
            out.append("")
        out += [line] if line.startswith("|") or out[-1] == "" else ["", line]
    return "\n".join(out)


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
    text = format_report(report)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        page = [PAGE_TITLE, "", provenance(report["command"]), "", PAGE_MODEL, "", _paragraphs(text)]
        Path(args.md).write_text("\n".join(page) + "\n")
    return report


if __name__ == "__main__":
    main()
