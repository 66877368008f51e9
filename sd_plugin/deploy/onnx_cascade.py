"""Early exit as deployable ONNX graphs: one graph per segment and per exit, the thresholds in a manifest.

A single static graph cannot skip work, so the cascade is cut at the exit
points: segment 0 maps images to exit point 1's feature, segment ``k`` maps
point ``k``'s feature to point ``k + 1``'s (the last one to the deepest logits),
and exit graph ``k`` maps point ``k``'s feature to that exit's logits.
:class:`OnnxCascade` runs them with ONNX Runtime and hands only the unanswered
samples to the next segment, exactly as :class:`~sd_plugin.deploy.EarlyExitModel` does.

Any backbone is cut the same way, without knowing its code: the model's own
forward runs as one segment (:func:`~sd_plugin.deploy.early_exit.run_segment`):
point ``k``'s output is replaced by the graph input and the pass stops at point
``k + 1``; the exporter's dead-code elimination drops
every operation before point ``k`` (their inputs are constants), so a segment
graph holds only its own stage's weights.

Example:
    >>> export_cascade(model, torch.randn(1, 3, 32, 32), "cascade/", ExitPolicy.load("policy.json"))
    >>> cascade = OnnxCascade("cascade/")
    >>> out = cascade(images_nchw_float32)   # out.logits (N, C), out.exit (N,) 1-based
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .._io import atomic_write, atomic_write_path
from ..core.naming import exit_name
from .early_exit import as_multi_exit, run_segment
from .policy import ExitPolicy

__all__ = ["CascadeOutput", "OnnxCascade", "export_cascade", "cascade_blocker"]

MANIFEST = "cascade.json"
MANIFEST_FORMAT = "sd_plugin.onnx_cascade/1"


class _Segment(nn.Module):
    """The model's forward from point ``start``'s value (or the images) to point ``stop``'s (or the logits);
    ``example`` (images) runs the model up to ``start``."""

    def __init__(self, model: nn.Module, start: Optional[int], stop: Optional[int], example: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.start = start
        self.stop = stop
        self.example = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_segment(self.model, x, self.start, self.stop, self.example)


class _Exit(nn.Module):
    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.model.forward_exit(self.k, feature)  # type: ignore[operator]


def _export(module: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings(), atomic_write_path(path) as tmp:
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(tmp),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def cascade_blocker(model: nn.Module) -> Optional[str]:
    """Why ``model`` cannot be cut into a cascade (an exit point that cannot hand on fewer samples), else ``None``."""
    fixed = [k + 1 for k, p in enumerate(as_multi_exit(model).exit_points) if not getattr(p, "shrinkable", True)]
    if not fixed:
        return None
    return (
        f"exit point(s) {fixed} cannot hand on fewer samples (the model's later code needs the whole batch), so "
        "the model cannot be cut there into a cascade"
    )


@torch.no_grad()
def export_cascade(
    model: nn.Module,
    example_input: torch.Tensor,
    out_dir: Union[str, Path],
    policy: ExitPolicy,
    *,
    opset_version: int = 17,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write ``segment{0..E}.onnx``, ``exit{1..E}.onnx`` and ``cascade.json`` (thresholds) under ``out_dir``.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel` in eval mode.
        example_input: (N, ...) input batch for tracing (N >= 2 advised; the batch axis stays dynamic).
        out_dir: Output folder.
        policy: The thresholds (:class:`ExitPolicy`, e.g. from :func:`~sd_plugin.deploy.calibrate`).
        opset_version: ONNX opset.
        check: Run every graph with ONNX Runtime on the example's features and compare with PyTorch.
        atol: Tolerance of the check.

    Returns:
        The manifest path.
    """
    mx = as_multi_exit(model)
    if model.training:
        raise ValueError("export the model in eval mode: call model.eval() first.")
    if policy.num_exits != mx.num_exits:
        raise ValueError(f"the policy has {policy.num_exits} thresholds for a model with {mx.num_exits} exits.")
    blocker = cascade_blocker(model)
    if blocker is not None:
        raise ValueError(f"{blocker}; use EarlyExitModel or other exit indices.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    e = mx.num_exits
    example = example_input[:1].detach().clone()
    starts: List[Optional[int]] = [None, *range(e)]
    stops: List[Optional[int]] = [*range(e), None]
    x = example_input
    segments, exits = [], []
    for i, (start, stop) in enumerate(zip(starts, stops)):
        seg = _Segment(model, start, stop, example).eval()  # a module in train mode would leave BN training
        y = seg(x)
        _export(seg, x, out / f"segment{i}.onnx", opset_version)
        segments.append((f"segment{i}.onnx", x, y))
        if stop is not None:
            ex = _Exit(model, stop).eval()
            _export(ex, y, out / f"{exit_name(stop, e)}.onnx", opset_version)
            exits.append((f"{exit_name(stop, e)}.onnx", y, ex(y)))
        x = y
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_exits": e,
        "segments": [name for name, _, _ in segments],
        "exits": [name for name, _, _ in exits],
        "criterion": policy.criterion,
        "thresholds": policy.thresholds,
        "input_shape": list(example_input.shape[1:]),
    }
    with atomic_write(out / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    if check:
        import onnxruntime as ort

        for name, inp, want in [*segments, *exits]:
            sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
            got = sess.run(None, {"x": inp.cpu().numpy()})[0]
            diff = float(np.abs(got - want.cpu().numpy()).max()) if got.shape == tuple(want.shape) else math.inf
            if not diff <= atol:
                raise ValueError(f"{name}: ONNX Runtime differs from PyTorch by {diff:.3g} (atol {atol}).")
    return out / MANIFEST


@dataclass
class CascadeOutput:
    """Result of :class:`OnnxCascade`: logits (N, C), exit (N,) 1-based (``num_exits + 1``: the deepest)."""

    logits: np.ndarray
    exit: np.ndarray
    samples_per_stage: List[int]


def _scores(logits: np.ndarray, criterion: str) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    if criterion == "max_prob":
        return np.exp(log_p.max(axis=1))
    if criterion == "margin":
        top2 = np.exp(np.sort(log_p, axis=1)[:, -2:])
        return top2[:, 1] - top2[:, 0]
    return (np.exp(log_p) * log_p).sum(axis=1)


def _read_manifest(path: Path) -> Dict[str, Any]:
    """The manifest as data: JSON, the right format, graph files named inside its own folder."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not an sd_plugin ONNX cascade manifest (not JSON: {err}); write it with export_cascade(...)."
        ) from err
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an sd_plugin ONNX cascade manifest (no format {MANIFEST_FORMAT!r}).")
    for key in ("segments", "exits"):
        names = m.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) and n == Path(n).name for n in names):
            raise ValueError(
                f"{path}: {key!r} must list the graph files of the export folder by bare file name, got {names!r}; "
                "write the cascade again with export_cascade(...)."
            )
    return m


class OnnxCascade:
    """Early-exit inference on ONNX Runtime from the files of :func:`export_cascade`.

    Args:
        path: The export folder or its ``cascade.json``.
        providers: ONNX Runtime execution providers (default: CPU).
        session_options: ``onnxruntime.SessionOptions`` for every graph (e.g. thread counts).
        thresholds: Override the manifest's thresholds (one per exit, ``exit1`` first; ``None``: never answers).
    """

    def __init__(
        self,
        path: Union[str, Path],
        providers: Optional[Sequence[str]] = None,
        session_options: Any = None,
        thresholds: Optional[Sequence[Optional[float]]] = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        manifest_path = path / MANIFEST if path.is_dir() else path
        if not manifest_path.is_file():
            raise ValueError(f"{manifest_path} not found: write the cascade with export_cascade(...) first.")
        m = _read_manifest(manifest_path)
        root = manifest_path.parent
        kw = dict(providers=list(providers or ["CPUExecutionProvider"]), sess_options=session_options)
        self.segments = [ort.InferenceSession(str(root / n), **kw) for n in m["segments"]]
        self.exits = [ort.InferenceSession(str(root / n), **kw) for n in m["exits"]]
        self.num_exits = int(m["num_exits"])
        policy = ExitPolicy(list(thresholds if thresholds is not None else m["thresholds"]), m["criterion"])
        if policy.num_exits != self.num_exits:
            raise ValueError(f"got {policy.num_exits} thresholds for a cascade with {self.num_exits} exits.")
        self.criterion = policy.criterion
        self.bounds = policy.bounds().tolist()

    def __call__(self, images: np.ndarray) -> CascadeOutput:
        """Answer every sample of ``images`` ((N, ...) float32, preprocessed as for the model)."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        n = x.shape[0]
        remaining = np.arange(n)
        exit_of = np.full(n, self.num_exits + 1, dtype=np.int64)
        logits: Optional[np.ndarray] = None
        entered = []
        for k in range(self.num_exits):
            x = self.segments[k].run(None, {"x": x})[0]
            entered.append(int(remaining.size))
            if self.bounds[k] == math.inf:
                continue
            lg = self.exits[k].run(None, {"x": x})[0]
            done = _scores(lg, self.criterion) >= self.bounds[k]
            if not done.any():
                continue
            if logits is None:
                logits = np.zeros((n, lg.shape[1]), dtype=lg.dtype)
            logits[remaining[done]] = lg[done]
            exit_of[remaining[done]] = k + 1
            keep = ~done
            remaining, x = remaining[keep], np.ascontiguousarray(x[keep])
            if remaining.size == 0:
                return CascadeOutput(logits, exit_of, [*entered, *[0] * (self.num_exits + 1 - len(entered))])
        deepest = self.segments[self.num_exits].run(None, {"x": x})[0]
        if logits is None:
            logits = deepest
        else:
            logits[remaining] = deepest
        return CascadeOutput(logits, exit_of, [*entered, int(remaining.size)])
