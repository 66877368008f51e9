"""Pipeline step 1, the trace: one forward pass that records the call tree.

:func:`trace` runs the model once with a pre- and post-hook on every submodule of
the root and records each call: its place in the call tree (which call was
running when it started), its order, and the batch-first tensors it returned.
The later steps read only this record (and ask the cut tests of
:mod:`._cuts`): which outputs can be exit features (:mod:`._candidates`), and
where the stages or blocks are (:mod:`._choice`).

The pass runs, where it can, on the meta device (shapes only: no arithmetic, so
even a large model is probed in well under a second; :func:`probe_mode` swaps the
weights); a model whose forward cannot run on meta tensors is probed for real, in
eval mode without gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Call", "Probe", "ProbeError", "trace", "probe_mode", "batch_of", "feature_tensors"]


def feature_tensors(value: Any, batch: int) -> List[Tuple[Optional[int], torch.Tensor]]:
    """``(index, tensor)`` of the batch-first tensors in a module's output (index None: the output itself)."""
    if isinstance(value, torch.Tensor):
        return [(None, value)] if value.dim() > 0 and value.shape[0] == batch else []
    if isinstance(value, (tuple, list)):
        return [
            (i, v) for i, v in enumerate(value) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch
        ]
    return []


def batch_of(value: Any) -> Optional[int]:
    """The batch size of a model output: the first dimension of its first tensor."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else None
    if isinstance(value, (tuple, list)):
        for v in value:
            b = batch_of(v)
            if b is not None:
                return b
    if isinstance(value, dict):
        for v in value.values():
            b = batch_of(v)
            if b is not None:
                return b
    return None


class ProbeError(ValueError):
    """The model's own forward failed on the probe input (wrong input size, channels, dtype ...)."""


@dataclass
class Call:
    """One module call of the probe pass."""

    name: str
    cls: str
    start: int
    parent: Optional[int]
    end: int = -1
    children: List[int] = field(default_factory=list)
    outputs: List[Tuple[Optional[int], torch.Tensor]] = field(default_factory=list)
    input_shape: Optional[Tuple[int, ...]] = None
    versions: List[int] = field(default_factory=list)  # each output's version counter when the call returned

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def written_later(self) -> bool:
        """Later code wrote into an output of this call in place (TNT's ``patch_embed[:, 1:] = ...``)."""
        return any(t._version != v for (_, t), v in zip(self.outputs, self.versions))


@dataclass
class Probe:
    """The traced pass: every call (in start order), how often each module ran, and the root's call."""

    calls: List[Call]
    times_called: Dict[str, int]
    root: Optional[int]
    input_shape: Tuple[int, ...]
    output_batch: Optional[int]
    output_shape: Optional[Tuple[int, ...]] = None


@contextlib.contextmanager
def _on_meta(owner: nn.Module) -> Iterator[None]:
    """Swap every parameter and buffer of ``owner`` for a meta tensor of the same shape and dtype, then back."""
    saved: List[Tuple[Dict[str, Any], str, Any]] = []
    try:
        for module in owner.modules():
            stores: List[Dict[str, Any]] = [module._parameters, module._buffers]
            for store in stores:
                for key, value in list(store.items()):
                    if value is None or value.device.type == "meta":
                        continue
                    saved.append((store, key, value))
                    meta = torch.empty_like(value, device="meta")
                    store[key] = nn.Parameter(meta, value.requires_grad) if isinstance(value, nn.Parameter) else meta
        yield
    finally:
        for saved_store, key, value in reversed(saved):
            saved_store[key] = value


@contextlib.contextmanager
def probe_mode(owner: nn.Module, meta: bool) -> Iterator[None]:
    """Eval mode, no gradients, and (``meta``) meta-device weights, all restored afterwards."""
    was_training = owner.training
    owner.eval()
    try:
        with torch.no_grad():
            if meta:
                with _on_meta(owner):
                    yield
            else:
                yield
    finally:
        owner.train(was_training)


def trace(root: nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Probe:
    """Run ``run(x)`` once with every submodule of ``root`` (and ``root``) traced."""
    batch = int(x.shape[0])
    calls: List[Call] = []
    stack: List[int] = []
    clock = [0]
    times: Dict[str, int] = {}
    handles = []

    def pre(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any) -> None:
            times[name] = times.get(name, 0) + 1
            parent = stack[-1] if stack else None
            first = feature_tensors(args, batch)
            call = Call(name, type(mod).__name__, clock[0], parent)
            clock[0] += 1
            call.input_shape = tuple(first[0][1].shape) if first else None
            if parent is not None:
                calls[parent].children.append(len(calls))
            stack.append(len(calls))
            calls.append(call)

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if not stack:
                return
            idx = stack.pop()
            calls[idx].end = clock[0]
            clock[0] += 1
            calls[idx].outputs = feature_tensors(output, batch)
            calls[idx].versions = [t._version for _, t in calls[idx].outputs]

        return hook

    for name, module in root.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name, module)))
        handles.append(module.register_forward_hook(post(name)))
    try:
        out = run(x)
    except (ValueError, TypeError):
        raise  # already says what is wrong (e.g. a head that does not fit the features)
    except Exception as e:
        raise ProbeError(f"{type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    root_call = next((i for i, c in enumerate(calls) if c.name == ""), None)
    first = out if isinstance(out, torch.Tensor) else None
    shape = tuple(int(s) for s in first.shape) if first is not None else None
    return Probe(calls, times, root_call, tuple(x.shape), batch_of(out), shape)
