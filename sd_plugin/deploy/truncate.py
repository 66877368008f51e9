"""A standalone classifier that ends at one exit: the backbone up to that exit, then the exit."""

from __future__ import annotations

import copy
import warnings
from typing import Any, List, Optional, Tuple, cast

import torch
import torch.nn as nn

from ..core import MultiExitModel, StopForward, get_submodule, select_feature
from ._trace import modules_run, replace_with_identity, unused_subtrees
from .early_exit import as_multi_exit

__all__ = ["TruncatedModel", "truncate"]


class TruncatedModel(nn.Module):
    """Exit ``exit_index``'s logits from images; the stages after that exit never run.

    A hook on the exit point stops the model's forward with
    :class:`~sd_plugin.core.StopForward` once the exit's feature exists. With an
    ``example_input`` the submodules the truncated pass never runs (later stages,
    the other exits, the deepest head) are replaced by ``nn.Identity``, so their
    weights are gone; the result is checked against the unpruned model on the example.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel`; it is deep-copied, not modified.
        exit_index: 0-based exit; ``model.num_exits`` gives the deepest classifier (the plain model).
        example_input: An input batch used to find (and check) what can be dropped; ``None`` keeps
            every weight.

    Example:
        >>> small = TruncatedModel(sd_model, exit_index=1, example_input=torch.randn(1, 3, 32, 32)).eval()
        >>> logits = small(images)
    """

    def __init__(self, model: nn.Module, exit_index: int, example_input: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        mx = as_multi_exit(model)
        if isinstance(exit_index, bool) or not isinstance(exit_index, int):
            raise TypeError(f"exit_index must be an int, got {exit_index!r}.")
        if not 0 <= exit_index <= mx.num_exits:
            raise ValueError(
                f"exit_index {exit_index} is out of range: this model has exits 0..{mx.num_exits - 1} and "
                f"{mx.num_exits} for the deepest classifier."
            )
        self.exit_index = exit_index
        self.model = copy.deepcopy(model)
        self.pruned: Tuple[str, ...] = ()
        if example_input is not None:
            self._prune(example_input)

    @property
    def _mx(self) -> MultiExitModel:
        return cast(MultiExitModel, self.model)

    @property
    def is_deepest(self) -> bool:
        return self.exit_index == self._mx.num_exits

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.is_deepest:
            return self._mx.forward_deepest(inputs)
        point = self._mx.exit_points[self.exit_index]
        module = get_submodule(self._mx.tapped_module(), point.module)
        found: List[torch.Tensor] = []

        def grab(value: Any) -> None:
            found.append(select_feature(value, point))
            raise StopForward

        if point.hook == "forward_pre":
            handle = module.register_forward_pre_hook(lambda m, args: grab(args))
        else:
            handle = module.register_forward_hook(lambda m, args, out: grab(out))
        try:
            self._mx.forward_deepest(inputs)
        except StopForward:
            pass
        finally:
            handle.remove()
        if not found:
            raise RuntimeError(f"the forward pass never reached exit point {point.module!r}.")
        return self._mx.forward_exit(self.exit_index, found[0])

    @torch.no_grad()
    def _prune(self, example: torch.Tensor) -> None:
        was_training = self.training
        self.eval()
        before = self.forward(example)
        full = copy.deepcopy(self.model)
        names = unused_subtrees(self.model, modules_run(self.model, lambda: self.forward(example)))
        replace_with_identity(self.model, names)
        try:
            after = self.forward(example)
            same = after.shape == before.shape and torch.allclose(after, before, rtol=1e-4, atol=1e-5)
        except Exception:  # the model used a dropped module's weights without calling it
            same = False
        if same:
            self.pruned = tuple(names)
        else:
            warnings.warn(
                f"{type(full).__name__}: dropping the unused submodules changed the output; keeping all weights.",
                stacklevel=3,
            )
            self.model = full
        self.train(was_training)


def truncate(model: nn.Module, exit_index: int, example_input: Optional[torch.Tensor] = None) -> TruncatedModel:
    """:class:`TruncatedModel` ending at ``exit_index``, in eval mode (see the class for the arguments)."""
    return TruncatedModel(model, exit_index, example_input).eval()
