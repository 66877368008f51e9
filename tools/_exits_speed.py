"""Wall-clock speed of early exit, eager PyTorch and the ONNX cascade (research tooling; the package's
``sd-plugin report --timing`` measures the eager figures alone).

Every figure is a ratio of medians of interleaved runs on the same images: the
deepest classifier (plain model) against early exit, at batch 1 and batch 32, in
PyTorch eager mode and on ONNX Runtime (the plain model's ONNX export against the
cascade of :mod:`sd_plugin.deploy.onnx_cascade`). An A/A pair (the plain model
timed twice under two names) gives the noise floor of the ratios. The ideal is
the FLOPs-weighted speed-up for the measured exit shares: plain FLOPs over the
average FLOPs spent per image (exits evaluated before the answering one included).

Command line (the model and data options are ``sd-plugin report``'s; the policy comes from ``sd-plugin calibrate``)::

    python -m tools._exits_speed CHECKPOINT [--config CFG] --policy policy.json --data ROOT --split test \
        --max-samples 1024 --repeats 15 --b1-images 64 [--no-onnx] [--threads N] [--out speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from sd_plugin.deploy import EarlyExitModel, ExitPolicy, export_onnx, truncate
from sd_plugin.deploy._timing import interleaved_times

__all__ = ["measure_speed", "main"]


def _ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    return statistics.median(times[num]) / statistics.median(times[den])


def _images(name: str, singles: List[torch.Tensor], batches: List[torch.Tensor]) -> int:
    return len(singles) if name.endswith("b1") else sum(len(b) for b in batches)


def _ort_options(threads: int) -> Any:
    """Session options for timing: ``threads`` intra-op threads (0: ONNX Runtime's default) that do not spin-wait
    after a run, so they take no CPU from whatever is timed next (PyTorch eager, in the interleaved rounds)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=_ort_options(threads), providers=["CPUExecutionProvider"])


def measure_speed(
    model: nn.Module,
    policy: ExitPolicy,
    images: torch.Tensor,
    *,
    repeats: int,
    num_singles: int = 64,
    onnx: bool = True,
    threads: int = 0,
    workdir: Optional[Path] = None,
) -> Dict[str, Any]:
    """Speed-ups of early exit over the plain model at batch 1 and 32 (eager and, optionally, ONNX Runtime).

    Args:
        model: The model with exits (eval mode).
        policy: The thresholds.
        images: Test images (preprocessed); batch 32 uses all of them in chunks of 32, batch 1 the first
            ``num_singles`` (default 64).
        repeats: Timed rounds (medians reported).
        onnx: Also time the ONNX cascade against the plain model's ONNX export.
        threads: ONNX Runtime intra-op threads (0: its default).
        workdir: Where the ONNX files go (default: a temporary folder).
    """
    ee = EarlyExitModel(model, policy).eval()
    deep = truncate(model, exit="deepest")
    batches = [b for b in images.split(32) if len(b) == 32] or [images]
    singles = [x[None] for x in images[:num_singles]]
    fns: Dict[str, Callable[[], Any]] = {
        "plain_b32": lambda: [deep(b) for b in batches],
        "ee_b32": lambda: [ee(b) for b in batches],
        "aa_b32": lambda: [deep(b) for b in batches],
        "plain_b1": lambda: [deep(x) for x in singles],
        "ee_b1": lambda: [ee(x) for x in singles],
        "aa_b1": lambda: [deep(x) for x in singles],
    }
    tmp = None
    if onnx:
        from sd_plugin.deploy.onnx_cascade import OnnxCascade, export_cascade

        if workdir is None:
            tmp = tempfile.TemporaryDirectory()
            workdir = Path(tmp.name)
        plain_path = export_onnx(deep, images[:2], workdir / "plain.onnx")
        export_cascade(model, images[:4], workdir / "cascade", policy)
        plain = _ort_session(plain_path, threads)
        cascade = OnnxCascade(workdir / "cascade", session_options=_ort_options(threads))
        np_batches = [b.numpy() for b in batches]
        np_singles = [x.numpy() for x in singles]
        fns.update(
            {
                "onnx_plain_b32": lambda: [plain.run(None, {"images": b}) for b in np_batches],
                "onnx_cascade_b32": lambda: [cascade(b) for b in np_batches],
                "onnx_plain_b1": lambda: [plain.run(None, {"images": x}) for x in np_singles],
                "onnx_cascade_b1": lambda: [cascade(x) for x in np_singles],
            }
        )
    try:
        with torch.inference_mode():
            times = interleaved_times({n: (lambda _i, f=f: f()) for n, f in fns.items()}, repeats)
    finally:
        if tmp is not None:
            tmp.cleanup()
    with torch.inference_mode():
        timed_exits = torch.cat([ee(b).exit for b in batches])
    shares = torch.bincount(timed_exits - 1, minlength=ee.policy.num_exits + 1).double() / timed_exits.numel()
    out: Dict[str, Any] = {
        "timed_exit_share": shares.tolist(),
        "speedup_b1": _ratio(times, "plain_b1", "ee_b1"),
        "speedup_b32": _ratio(times, "plain_b32", "ee_b32"),
        "aa_b1": _ratio(times, "plain_b1", "aa_b1"),
        "aa_b32": _ratio(times, "plain_b32", "aa_b32"),
        "ms_per_image": {k: 1e3 * statistics.median(v) / _images(k, singles, batches) for k, v in times.items()},
        "images_b1": len(singles),
        "images_b32": sum(len(b) for b in batches),
        "repeats": repeats,
    }
    if onnx:
        out["onnx_speedup_b1"] = _ratio(times, "onnx_plain_b1", "onnx_cascade_b1")
        out["onnx_speedup_b32"] = _ratio(times, "onnx_plain_b32", "onnx_cascade_b32")
        out["onnx_vs_eager_plain_b32"] = _ratio(times, "plain_b32", "onnx_plain_b32")
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Measure one policy on a checkpoint's test images; print (and optionally write) the figures as JSON."""
    from sd_plugin.cli._data import add_data_args, data_spec
    from sd_plugin.cli._load import add_model_args, add_progress_arg, load_model
    from sd_plugin.cli.calibrate import collect

    p = argparse.ArgumentParser(prog="python -m tools._exits_speed", description=__doc__.splitlines()[0])
    add_model_args(p)
    add_data_args(p, split="test", what="test images, timed")
    p.add_argument("--policy", required=True, help="ExitPolicy JSON (sd-plugin calibrate)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    p.add_argument("--b1-images", type=int, default=64, help="images timed one by one")
    p.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    p.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: their defaults)")
    p.add_argument("--out", help="JSON file to write")
    add_progress_arg(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args)
    spec = data_spec(args)
    _, images = collect(loaded, spec, "test images", not args.no_progress, keep=spec.max_samples or 1 << 30)
    speed = measure_speed(
        loaded.model,
        ExitPolicy.load(args.policy),
        images,
        repeats=args.repeats,
        num_singles=args.b1_images,
        onnx=not args.no_onnx,
        threads=args.threads,
    )
    result = {
        "model": loaded.name,
        "checkpoint": args.checkpoint,
        "policy": args.policy,
        "data": spec.describe(),
        "torch_threads": torch.get_num_threads(),
        **speed,
        "command": " ".join(["python -m tools._exits_speed", *(argv if argv is not None else sys.argv[1:])]),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from sd_plugin._io import atomic_write

        with atomic_write(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
