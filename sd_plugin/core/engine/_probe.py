"""The probe: one traced forward pass, and the test that a module is on the main path.

:func:`trace` runs the model once with a pre- and post-hook on every submodule of
the root and records each call: its place in the call tree (which call was
running when it started), its order, and the batch-first tensors it returned.
:func:`is_cut` checks that a module is a *cut* of the forward pass — everything
after it depends on the batch only through its output — by handing on a smaller
batch from a hook there and checking that the model then returns that smaller
batch (a residual branch or a side input breaks this). That is exactly the
property early-exit inference relies on.

Both run, where they can, on the meta device (shapes only: no arithmetic, so even
a large model is probed in well under a second); a model whose forward cannot run
on meta tensors is probed for real, in eval mode without gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Call", "Probe", "ProbeError", "trace", "is_cut", "is_value_cut", "batch_of", "feature_tensors"]

#: Probe batch: a cut test keeps 2 of 3 samples, so a broadcast (1 vs N) cannot pass for a smaller batch.
PROBE_BATCH = 3


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


def _shrink(value: Any, batch: int, keep: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_shrink(v, batch, keep) for v in value)
    return value


def is_cut(root: nn.Module, name: str, run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> bool:
    """Whether handing on fewer samples from module ``name`` makes the whole model return fewer samples."""
    batch = int(x.shape[0])
    keep = batch - 1
    fired = [0]

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        fired[0] += 1
        return _shrink(output, batch, keep) if fired[0] == 1 else None

    handle = root.get_submodule(name).register_forward_hook(hook)
    try:
        out = run(x)
    except Exception:  # noqa: BLE001 - any failure means the smaller batch does not flow through
        return False
    finally:
        handle.remove()
    return fired[0] == 1 and batch_of(out) == keep


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor)


def is_value_cut(root: nn.Module, name: str, run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> bool:
    """Whether the model's output depends on the input only through module ``name``'s output (real tensors only).

    Runs the model on ``x``, then on other inputs with that module's output replaced by the first run's: a cut
    gives the first run's output again, exactly (eval mode is deterministic).
    """
    seen: List[Any] = []

    # Copies: later layers may write into the very tensor a module returned (TNT's ``patch_embed[:, 1:] = ...``).
    def record(mod: nn.Module, args: Any, output: Any) -> None:
        seen.append(_clone(output))

    def replace(mod: nn.Module, args: Any, output: Any) -> Any:
        seen.append(output)
        return _clone(seen[0]) if len(seen) == 2 else None

    module = root.get_submodule(name)
    x = x[:1]  # one sample is enough here (the batch is not what is tested), and a third of the cost
    g = torch.Generator().manual_seed(1)
    other = torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)
    try:
        handle = module.register_forward_hook(record)
        try:
            first = run(x)
        finally:
            handle.remove()
        handle = module.register_forward_hook(replace)
        try:
            second = run(other)
        finally:
            handle.remove()
    except Exception:  # noqa: BLE001 - a failure means the output cannot stand in for the input
        return False
    return len(seen) == 2 and _same(first, second)
