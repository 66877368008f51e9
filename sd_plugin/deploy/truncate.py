"""A standalone classifier that ends at one exit: the backbone up to that exit, then the exit."""

from __future__ import annotations

import copy
import warnings
from typing import Any, List, Optional, Tuple, cast

import torch
import torch.nn as nn

from ..core import MultiExitModel, StopForward
from ._numbering import ExitRef, exit_name, from_index, resolve_exit, warn_exit_index
from ._trace import modules_run, replace_with_identity, unused_subtrees
from .early_exit import as_multi_exit, intercepting

__all__ = ["TruncatedModel", "truncate"]


class TruncatedModel(nn.Module):
    """``exit``'s logits from images; the stages after that exit never run.

    The model's forward stops with :class:`~sd_plugin.core.StopForward` once
    the exit's feature exists (through the model's exit engine). With an
    ``example_input`` the submodules the truncated pass never runs (later stages,
    the other exits, the deepest head) are replaced by ``nn.Identity``, so their
    weights are gone; the result is checked against the unpruned model on the example.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel`; it is deep-copied, not modified.
        exit_index: Deprecated 0-based exit (``model.num_exits``: the deepest); use ``exit``.
        example_input: An input batch used to find (and check) what can be dropped; ``None`` keeps
            every weight.
        exit: The exit as the training log names it: 1 (``exit1``, the shallowest) ... ``num_exits + 1``,
            ``'exitN'`` or ``'deepest'`` (the plain model).

    Example:
        >>> small = TruncatedModel(sd_model, exit=2, example_input=torch.randn(1, 3, 32, 32)).eval()
        >>> logits = small(images)
    """

    def __init__(
        self,
        model: nn.Module,
        exit_index: Optional[int] = None,
        example_input: Optional[torch.Tensor] = None,
        *,
        exit: Optional[ExitRef] = None,
    ) -> None:
        super().__init__()
        mx = as_multi_exit(model)
        self._index = _index_of(mx.num_exits, exit, exit_index)
        self.exit = self._index + 1
        self.model = copy.deepcopy(model)
        self.pruned: Tuple[str, ...] = ()
        if example_input is not None:
            self._prune(example_input)

    @property
    def exit_index(self) -> int:
        """Deprecated: the 0-based exit (``exit - 1``)."""
        warn_exit_index("TruncatedModel.exit_index", "TruncatedModel.exit")
        return self._index

    @property
    def exit_name(self) -> str:
        """The training log's name of the exit: ``'exit1'`` ... or ``'deepest'``."""
        return exit_name(self._index, self._mx.num_exits)

    @property
    def _mx(self) -> MultiExitModel:
        return cast(MultiExitModel, self.model)

    @property
    def is_deepest(self) -> bool:
        return self._index == self._mx.num_exits

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.is_deepest:
            return self._mx.forward_deepest(inputs)
        target = self._index
        found: List[torch.Tensor] = []

        def grab(k: int, feature: torch.Tensor, value: Any) -> None:
            if k == target:
                found.append(feature)
                raise StopForward

        try:
            with intercepting(self.model, grab):
                self._mx.forward_deepest(inputs)
        except StopForward:
            pass
        if not found:
            raise RuntimeError(f"the forward pass never reached exit point {self._mx.exit_points[target].module!r}.")
        return self._mx.forward_exit(target, found[0])

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


def _index_of(num_exits: int, exit: Optional[ExitRef], exit_index: Optional[int]) -> int:
    if (exit is None) == (exit_index is None):
        raise TypeError("give the exit to end at: exit=1 ... num_exits + 1 or 'deepest' (exit_index is deprecated).")
    if exit is not None:
        return resolve_exit(exit, num_exits)
    warn_exit_index("exit_index (or a positional exit number)", "exit=", stacklevel=4)
    return from_index(exit_index, num_exits)


def truncate(
    model: nn.Module,
    exit_index: Optional[int] = None,
    example_input: Optional[torch.Tensor] = None,
    *,
    exit: Optional[ExitRef] = None,
) -> TruncatedModel:
    """:class:`TruncatedModel` ending at ``exit`` (1-based, or ``'deepest'``), in eval mode.

    ``truncate(model, exit=2, example_input=x)`` ends at ``exit2``; the positional/``exit_index`` form is 0-based
    and deprecated (see the class for the arguments).
    """
    if exit_index is not None and exit is None:
        mx = as_multi_exit(model)
        warn_exit_index("exit_index (or a positional exit number)", "exit=", stacklevel=3)
        exit = from_index(exit_index, mx.num_exits) + 1
        exit_index = None
    return TruncatedModel(model, exit_index, example_input, exit=exit).eval()
