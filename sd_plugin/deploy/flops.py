"""FLOPs and parameters up to each exit, counted by mmengine's ``FlopAnalyzer``.

mmengine's tracer cannot follow a forward pass that a hook ends early, so the
cost of the backbone up to exit ``k`` is the deepest pass's FLOPs minus those of
the submodules that the truncated model drops (:class:`TruncatedModel` finds
them by running it); the exit's own FLOPs are counted on its feature.
FLOPs follow mmengine/fvcore's convention: one multiply-add counts as one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, cast

import torch
import torch.nn as nn

from ..core import MultiExitModel
from .early_exit import as_multi_exit, forward_with_features
from .truncate import TruncatedModel

__all__ = ["ExitCosts", "exit_costs", "count_flops", "count_call_flops"]


def count_flops(module: nn.Module, *inputs: Any) -> tuple:
    """(total, by_module) FLOPs of ``module(*inputs)`` with mmengine's ``FlopAnalyzer`` (one multiply-add = 1)."""
    from mmengine.analysis import FlopAnalyzer

    analyzer = FlopAnalyzer(module, inputs)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings("none")
    return int(analyzer.total()), {k: int(v) for k, v in analyzer.by_module().items()}


class _Call(nn.Module):
    """``fn(x)`` as the forward of a module holding ``model`` (so the counter names ``model.<submodule>``)."""

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.fn(x))


def count_call_flops(model: nn.Module, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> tuple:
    """(total, by_module) FLOPs of ``fn(x)``, a method or closure over ``model`` (module names ``model.<name>``)."""
    return count_flops(_Call(model, fn), x)


@dataclass
class ExitCosts:
    """Per-exit costs of a model with E exits.

    Attributes:
        flops: E + 1 FLOPs of a standalone model ending at each exit (the last: the plain model).
        params: E + 1 parameters of those models.
        exit_flops: E FLOPs of each exit block alone, on its feature.
    """

    flops: List[int]
    params: List[int]
    exit_flops: List[int]

    def answer_costs(self) -> List[int]:
        """FLOPs spent on a sample answered at each exit under early exit (earlier exits included)."""
        out = []
        for k, f in enumerate(self.flops):
            out.append(f + sum(self.exit_flops[:k]))
        return out

    def fractions(self) -> List[float]:
        """:attr:`flops` relative to the plain model's."""
        return [f / self.flops[-1] for f in self.flops]

    def answer_fractions(self) -> List[float]:
        """:meth:`answer_costs` relative to the plain model's FLOPs (the last one exceeds 1 by the exits' cost)."""
        return [f / self.flops[-1] for f in self.answer_costs()]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def exit_costs(model: nn.Module, example_input: torch.Tensor) -> ExitCosts:
    """FLOPs and parameters up to each exit, for inputs shaped like ``example_input`` (batch 1 advised).

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel` in eval mode.
        example_input: An input batch, e.g. ``torch.randn(1, 3, 224, 224)``.
    """
    mx: MultiExitModel = as_multi_exit(model)
    module = cast(nn.Module, model)
    deepest_total, by_module = count_call_flops(module, mx.forward_deepest, example_input)
    feats: Sequence[torch.Tensor] = forward_with_features(mx, example_input)[1]
    exit_flops = [count_call_flops(module, functools.partial(mx.forward_exit, k), f)[0] for k, f in enumerate(feats)]
    flops, params = [], []
    for k in range(mx.num_exits + 1):
        trunc = TruncatedModel(module, example_input=example_input, exit=k + 1)
        dropped = sum(by_module.get(f"model.{name}", 0) for name in trunc.pruned)
        flops.append(deepest_total - dropped + (exit_flops[k] if k < mx.num_exits else 0))
        params.append(_params(trunc))
    return ExitCosts(flops, params, exit_flops)
