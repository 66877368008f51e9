"""``ResumableFSDPStrategy``: mmengine's ``FSDPStrategy`` whose resume works with current torch.

mmengine 0.10.7's ``FSDPStrategy.load_optim_state_dict`` calls
``FSDP.optim_state_dict_to_load(state_dict, model, optimizer)`` in the argument order of torch 2.0. torch
changed the order to ``(model, optim, optim_state_dict)``, so every resume of an FSDP run (``FlexibleRunner``,
``resume=True``) stops with ``TypeError: unhashable type: 'dict'``. This strategy is ``FSDPStrategy`` in every
other respect and makes only that call, with keyword arguments, so it is right for either order.

Use it in place of ``FSDPStrategy`` (on a CPU-only machine the wrapper also needs ``device_id='cpu'``)::

    runner_type = 'FlexibleRunner'
    strategy = dict(type='ResumableFSDPStrategy',
                    model_wrapper=dict(type='MMFullyShardedDataParallel', device_id='cpu'))

Importing this module registers it in sd_plugin's ``STRATEGIES`` (the plain name in mmengine's too).
"""

from __future__ import annotations

from typing import Any, Dict

from mmengine._strategy.fsdp import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ..registry import STRATEGIES

__all__ = ["ResumableFSDPStrategy", "RESUMABLE_FSDP_STRATEGY"]

RESUMABLE_FSDP_STRATEGY = "ResumableFSDPStrategy"


@STRATEGIES.register_module(name=RESUMABLE_FSDP_STRATEGY)
class ResumableFSDPStrategy(FSDPStrategy):
    """mmengine's ``FSDPStrategy``; ``load_optim_state_dict`` passes torch's arguments by keyword."""

    def load_optim_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load the optimizer state saved by :meth:`optim_state_dict` (sharded or full, as configured).

        Args:
            state_dict: The checkpoint's ``'optimizer'`` entry.
        """
        optim_state_dict = FSDP.optim_state_dict_to_load(
            model=self.model, optim=self.optim_wrapper.optimizer, optim_state_dict=state_dict
        )
        self.optim_wrapper.load_state_dict(optim_state_dict)
