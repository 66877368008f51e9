"""Pipeline step 3, the cut tests: is a module on the main path of the forward pass?

A module is a *cut* when everything after it depends on the input only through its output — exactly what an
exit there and early exit need. Two tests tell:

- :func:`is_cut` (meta or real tensors): hand on a smaller batch from a hook on the module and check that the model
  then returns that smaller batch (a residual branch or a side input breaks this);
- :func:`is_value_cut` (real tensors only): run the model twice with the module's output of the first run swapped
  into the second; an identical result proves the cut even where later code needs the full batch (Twins-SVT
  reshapes with the input's batch size), but such a point cannot hand on fewer samples (not *shrinkable*).

:class:`CutOracle` runs them once per module for one traced probe pass and remembers the answers.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

from ._probe import Probe, batch_of

__all__ = ["PROBE_BATCH", "CutOracle", "is_cut", "is_value_cut"]

#: Samples in the probe input. The shrink test hands on ``PROBE_BATCH - SAMPLES_DROPPED`` = 2 of them, and that
#: kept batch must not be 1: a batch of one broadcasts against the full batch, and ``x.squeeze()`` drops its batch
#: dimension. MMPretrain's LeNet-5 feeds ``features(x).squeeze()`` to its classifier: at 2 no module of it passes
#: the test and it gets no exits.
PROBE_BATCH = 3

#: Samples the shrink test drops at the module it tests: one is enough for the model's output batch to show it.
SAMPLES_DROPPED = 1

#: Seed of the second input of the value test: any input other than the first one does.
_VALUE_TEST_SEED = 1


def _shrink(value: Any, batch: int, keep: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_shrink(v, batch, keep) for v in value)
    return value


def is_cut(root: nn.Module, name: str, run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> bool:
    """Whether handing on fewer samples from module ``name`` makes the whole model return fewer samples."""
    batch = int(x.shape[0])
    keep = batch - SAMPLES_DROPPED
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
    g = torch.Generator().manual_seed(_VALUE_TEST_SEED)
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


class CutOracle:
    """The cut tests of one probe pass, each module tested once.

    Attributes:
        shrinkable: Per tested module, whether it passed the shrink test (early exit may hand on fewer samples).
        unjudged: Containers the meta probe could not judge: they fail the shrink test, and only the value test of a
            real probe can tell whether they are cuts (Twins-SVT's stages).
    """

    def __init__(
        self, root: nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor, probe: Probe, meta: bool
    ) -> None:
        self.root, self.run, self.x, self.probe, self.meta = root, run, x, probe, meta
        self._cuts: Dict[str, bool] = {}
        self.shrinkable: Dict[str, bool] = {}
        self.unjudged: List[str] = []

    def __call__(self, name: str) -> bool:
        """On the main path: handing on fewer samples there works, or (real probe) nothing else carries the input."""
        if name not in self._cuts:
            shrink = is_cut(self.root, name, self.run, self.x)
            self.shrinkable[name] = shrink
            if not shrink and self.meta and any(c.name == name and c.children for c in self.probe.calls):
                self.unjudged.append(name)  # a container only a real probe (the value test) can judge
            self._cuts[name] = shrink or (not self.meta and is_value_cut(self.root, name, self.run, self.x))
        return self._cuts[name]
