"""ONNX export of a (truncated) classifier, checked against ONNX Runtime.

The TorchScript-based exporter (``dynamo=False``) is used: it follows the
Python control flow of a forward pass that a hook ends early, which the
``torch.export``-based exporter of torch 2.x rejects.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .._io import atomic_write_path

__all__ = ["export_onnx", "check_onnx", "missing_onnx_modules"]


def missing_onnx_modules(run: bool = True) -> List[str]:
    """The modules ONNX export needs that are not installed: onnx, and onnxruntime when the graphs are also run
    (the export's check, timing)."""
    needed = ["onnx"] + (["onnxruntime"] if run else [])
    return [m for m in needed if importlib.util.find_spec(m) is None]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: Union[str, Path],
    *,
    dynamic_batch: bool = True,
    opset_version: int = 17,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export ``model`` (in eval mode) to ONNX with input 'images' and output 'logits'.

    Args:
        model: Any classifier, e.g. a :class:`~sd_plugin.deploy.TruncatedModel`.
        example_input: (N, 3, H, W) batch used for tracing (and the check).
        path: Output ``.onnx`` file.
        dynamic_batch: Let the batch dimension vary.
        opset_version: ONNX opset.
        check: Run the file with ONNX Runtime and compare with PyTorch (see :func:`check_onnx`).
        atol: Tolerance of the check.

    Returns:
        The path written.
    """
    if model.training:
        raise ValueError("export the model in eval mode: call model.eval() first.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), atomic_write_path(path) as tmp:
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_input,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
            opset_version=opset_version,
            dynamo=False,
        )
    if check:
        check_onnx(model, path, example_input, atol=atol)
    return path


def check_onnx(
    model: nn.Module, path: Union[str, Path], inputs: torch.Tensor, atol: float = 1e-4, rtol: Optional[float] = 1e-3
) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's outputs; ValueError beyond ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.detach().cpu().numpy()})[0]
    with torch.no_grad():
        want = model(inputs).detach().cpu().numpy()
    if got.shape != want.shape:
        raise ValueError(f"ONNX output shape {got.shape} differs from PyTorch's {want.shape}.")
    diff = float(np.abs(got - want).max())
    if not np.allclose(got, want, atol=atol, rtol=rtol or 0.0):
        raise ValueError(f"ONNX Runtime's output differs from PyTorch's by up to {diff:.3g} (atol {atol}).")
    return diff
