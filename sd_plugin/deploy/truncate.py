"""A standalone classifier that ends at one exit: the backbone up to that exit, then the exit."""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Tuple, cast

import torch
import torch.nn as nn

from ..core import MultiExitModel
from ..core.naming import ExitRef, exit_name, resolve_exit
from ._trace import modules_run, replace_with_identity, unused_subtrees
from .early_exit import as_multi_exit, run_segment

__all__ = ["TruncatedModel", "truncate"]


class TruncatedModel(nn.Module):
    """``exit``'s logits from images; the stages after that exit never run.

    The model's forward stops once the exit's feature exists
    (:func:`~sd_plugin.deploy.early_exit.run_segment`, the model's exit engine). With an
    ``example_input`` the submodules the truncated pass never runs (later stages,
    the other exits, the deepest head) are replaced by ``nn.Identity``, so their
    weights are gone; the result is checked against the unpruned model on the example.

    Args:
        model: A :class:`~sd_plugin.core.MultiExitModel`; it is deep-copied, not modified.
        exit: The exit as the training log names it: 1 (``exit1``, the shallowest) ... ``num_exits + 1``,
            ``'exitN'`` or ``'deepest'`` (the plain model).
        example_input: An input batch used to find (and check) what can be dropped; ``None`` keeps
            every weight.

    Example:
        >>> small = TruncatedModel(sd_model, exit=2, example_input=torch.randn(1, 3, 32, 32)).eval()
        >>> logits = small(images)
    """

    def __init__(self, model: nn.Module, exit: ExitRef, example_input: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        mx = as_multi_exit(model)
        self._index = resolve_exit(exit, mx.num_exits)
        self.exit = self._index + 1
        self.model = copy.deepcopy(model)
        self.pruned: Tuple[str, ...] = ()
        if example_input is not None:
            self._prune(example_input)

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
        return self._mx.forward_exit(self._index, run_segment(self.model, inputs, stop=self._index))

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


def truncate(model: nn.Module, exit: ExitRef, example_input: Optional[torch.Tensor] = None) -> TruncatedModel:
    """:class:`TruncatedModel` ending at ``exit`` (1-based, ``'exitN'`` or ``'deepest'``), in eval mode.

    ``truncate(model, exit=2, example_input=x)`` ends at ``exit2`` (see the class for the arguments).
    """
    return TruncatedModel(model, exit, example_input).eval()
