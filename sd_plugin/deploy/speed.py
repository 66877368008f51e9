"""Measured wall-clock speed-up of early exit over the plain model, in eager PyTorch and on ONNX Runtime.

Every figure is a ratio of medians of interleaved rounds (:mod:`sd_plugin.deploy._timing`) on the same images:
the plain model (the deepest classifier, :func:`~sd_plugin.deploy.truncate` at ``'deepest'``) over early exit
(:class:`~sd_plugin.deploy.EarlyExitModel`), at batch 1 (images one by one) and batch 32. The plain model timed
against itself under a second name (A/A) is the noise floor: a speed-up within the A/A's distance from 1 is no
speed-up. On ONNX Runtime the plain model's export (:func:`~sd_plugin.deploy.export_onnx`) is timed against the
cascade (:func:`~sd_plugin.deploy.export_cascade`, :class:`~sd_plugin.deploy.OnnxCascade`), both on the CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._timing import each, interleaved_medians, timed_inputs
from .early_exit import EarlyExitModel
from .onnx import export_onnx, missing_onnx_modules
from .onnx_cascade import OnnxCascade, cascade_blocker, export_cascade
from .policy import ExitPolicy
from .truncate import truncate

__all__ = ["measure_speedup", "onnx_unavailable"]

BATCHES = ("b1", "b32")
CASCADE_EXAMPLE = 4  # images traced and checked by the ONNX exports


def onnx_unavailable(model: nn.Module) -> Optional[str]:
    """Why :func:`measure_speedup` cannot time ``model`` on ONNX Runtime (a module missing, an exit point the
    cascade cannot cut at), or ``None`` when it can."""
    missing = missing_onnx_modules()
    if missing:
        return f"needs {' and '.join(missing)}: pip install 'sd-plugin[export]'"
    return cascade_blocker(model)


def _ort_options() -> Any:
    """ONNX Runtime session options for timing: as many intra-op threads as torch uses, and no spin-waiting after
    a run, so its threads take no CPU from whatever is timed next in the interleaved round."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _arms(
    backend: str, plain: Callable[[Any], object], ee: Callable[[Any], object], inputs: Mapping[str, Sequence[Any]]
) -> Dict[str, Callable[[], object]]:
    """The timed units of one backend: plain, early exit and plain again (A/A) at each batch size."""
    fns: Dict[str, Callable[[], object]] = {}
    for b, xs in inputs.items():
        fns.update({f"{backend}_plain_{b}": each(plain, xs), f"{backend}_ee_{b}": each(ee, xs)})
        fns[f"{backend}_aa_{b}"] = each(plain, xs)
    return fns


def measure_speedup(
    model: nn.Module,
    policy: Union[ExitPolicy, Sequence[Optional[float]]],
    images: torch.Tensor,
    *,
    b1_images: int = 64,
    repeats: int = 15,
    onnx: Optional[bool] = None,
) -> Dict[str, float]:
    """Speed-up of early exit over the plain model at batch 1 and 32, eager and on ONNX Runtime, with A/A pairs.

    All timed functions run in turn within every round (ABBA order), so drift on a shared machine hits them alike;
    each figure is the plain model's median time over early exit's (or over the plain model's own, for A/A).
    Batch 1 is the first ``b1_images`` images one by one; batch 32 is one batch of 32 (``images`` repeated when
    there are fewer). The ONNX graphs are written to a temporary folder, checked against PyTorch, and run on the
    CPU with as many threads as torch uses.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel` in eval mode (on any device; ONNX runs on the CPU).
        policy: The thresholds (:class:`~sd_plugin.deploy.ExitPolicy` or one per exit).
        images: (N, ...) preprocessed images, on the model's device.
        b1_images: Images timed one by one.
        repeats: Timed rounds (medians reported), after one warm-up round.
        onnx: Also time ONNX Runtime: ``None`` when :func:`onnx_unavailable` finds nothing against it, ``True``
            always (ValueError when it cannot), ``False`` never.

    Returns:
        ``eager_speedup_b1``, ``eager_aa_b1``, ``eager_speedup_b32``, ``eager_aa_b32`` and, when ONNX is timed,
        the same with ``onnx_``: plain time over early exit's (over plain's own for ``aa``); above 1 is faster.

    Example:
        >>> model = sd_plugin.wrap(timm.create_model("resnet18", num_classes=10)).eval()
        >>> speed = measure_speedup(model, ExitPolicy.load("policy.json"), images, repeats=15)
        >>> speed["eager_speedup_b1"], speed["eager_aa_b1"]   # e.g. (1.42, 1.01): 1.42x, noise about 1%
    """
    if b1_images < 1:
        raise ValueError(f"b1_images must be >= 1, got {b1_images}.")
    blocker = onnx_unavailable(model) if onnx is not False else None
    if onnx and blocker is not None:
        raise ValueError(f"cannot time ONNX Runtime: {blocker}.")
    ee, plain = EarlyExitModel(model, policy).eval(), truncate(model, exit="deepest")
    ones, b32 = timed_inputs(images, b1_images)
    fns = _arms("eager", plain, ee, {"b1": ones, "b32": [b32]})
    backends = ["eager"]
    with tempfile.TemporaryDirectory(prefix="sd_plugin_speed_") as tmp:
        if onnx is not False and blocker is None:
            fns.update(_onnx_arms(model, ee.policy, b32, ones, Path(tmp)))
            backends.append("onnx")
        t = interleaved_medians(fns, repeats, prime=True)
    out: Dict[str, float] = {}
    for backend in backends:
        for b in BATCHES:
            plain_time = t[f"{backend}_plain_{b}"]
            out[f"{backend}_speedup_{b}"] = plain_time / t[f"{backend}_ee_{b}"]
            out[f"{backend}_aa_{b}"] = plain_time / t[f"{backend}_aa_{b}"]
    return out


def _onnx_arms(
    model: nn.Module, policy: ExitPolicy, b32: torch.Tensor, ones: List[torch.Tensor], folder: Path
) -> Dict[str, Callable[[], object]]:
    """The plain model's ONNX export and the cascade, written under ``folder``, as timed units."""
    import onnxruntime as ort

    example = b32[:CASCADE_EXAMPLE]
    plain_path = export_onnx(truncate(model, exit="deepest"), example, folder / "plain.onnx")
    export_cascade(model, example, folder / "cascade", policy)
    opts = _ort_options()
    session = ort.InferenceSession(str(plain_path), sess_options=opts, providers=["CPUExecutionProvider"])
    cascade = OnnxCascade(folder / "cascade", session_options=opts)
    inputs = {"b1": [x.cpu().numpy() for x in ones], "b32": [b32.cpu().numpy()]}
    return _arms("onnx", lambda x: session.run(None, {"images": x}), cascade, inputs)
