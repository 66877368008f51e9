"""bfloat16 mixed precision for mmengine training on CPU.

mmengine's ``AmpOptimWrapper`` refuses to run without a GPU (it asserts CUDA,
NPU, MLU or MUSA in ``__init__``) although mmengine's own ``autocast`` supports
CPU bfloat16. :class:`CPUAutocastOptimWrapper` is a plain ``OptimWrapper`` whose
``optim_context`` enters ``mmengine.runner.amp.autocast`` on the CPU. bfloat16
has float32's exponent range, so no loss scaling is needed. On GPUs keep using
mmengine's ``AmpOptimWrapper`` (``sd-plugin train --amp`` picks it there).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.runner.amp import autocast

from .registry import OPTIM_WRAPPERS

__all__ = ["CPUAutocastOptimWrapper"]


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` that runs the forward pass under CPU bfloat16 autocast.

    Args:
        dtype: Autocast dtype; CPU autocast in mmengine supports only
            ``'bfloat16'``.
        **kwargs: Passed to :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: Union[str, torch.dtype] = "bfloat16", **kwargs: Any) -> None:
        if dtype not in ("bfloat16", torch.bfloat16):
            raise ValueError(
                f"CPUAutocastOptimWrapper supports dtype='bfloat16' only, got {dtype!r}; float16 autocast "
                "needs a GPU (use type='AmpOptimWrapper' there)."
            )
        kwargs.pop("loss_scale", None)  # set by `--amp` for AmpOptimWrapper; bfloat16 needs no scaling
        super().__init__(**kwargs)
        self.cast_dtype = torch.bfloat16

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the optimizer state; a GradScaler state from an ``AmpOptimWrapper`` checkpoint is dropped."""
        state_dict = dict(state_dict)
        state_dict.pop("loss_scaler", None)
        super().load_state_dict(state_dict)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Gradient-accumulation context of ``OptimWrapper`` plus CPU bfloat16 autocast."""
        with super().optim_context(model), autocast(device_type="cpu", dtype=self.cast_dtype):
            yield
