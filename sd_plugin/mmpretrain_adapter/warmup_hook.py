"""``DistillWeightWarmupHook``: ramps the KD and hint weights from 0 at the start of training."""

from __future__ import annotations

from typing import Any, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..registry import HOOKS

__all__ = ["DistillWeightWarmupHook"]


@HOOKS.register_module()
class DistillWeightWarmupHook(Hook):
    """Linearly ramp the self-distillation (KD and hint) weights from 0 to their configured values.

    Early in training the deepest classifier is a poor teacher; this hook lets
    the exits learn from labels first. The scale is ``min(1, t / warmup)``, with
    ``t`` the number of finished iterations (or epochs, counted fractionally per
    iteration), set before every training iteration, so it is right after
    ``resume`` as well. Works with or without a DDP wrapper.

    Args:
        warmup_iters: Length of the ramp in iterations.
        warmup_epochs: Length of the ramp in epochs (give one of the two).

    Example:
        >>> custom_hooks = [dict(type='DistillWeightWarmupHook', warmup_epochs=5)]
    """

    priority = "NORMAL"

    def __init__(self, warmup_iters: Optional[int] = None, warmup_epochs: Optional[int] = None) -> None:
        if (warmup_iters is None) == (warmup_epochs is None):
            raise ValueError(
                "DistillWeightWarmupHook needs exactly one of warmup_iters or warmup_epochs, "
                f"got warmup_iters={warmup_iters!r}, warmup_epochs={warmup_epochs!r}."
            )
        value = warmup_iters if warmup_iters is not None else warmup_epochs
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the warm-up length must be an int >= 0, got {value!r}.")
        self.warmup_iters = warmup_iters
        self.warmup_epochs = warmup_epochs

    def scale_at(self, runner: Any) -> float:
        """The KD/hint scale for the runner's current iteration."""
        if self.warmup_iters is not None:
            length = float(self.warmup_iters)
        else:
            length = float(self.warmup_epochs) * len(runner.train_dataloader)  # type: ignore[arg-type]
        if length <= 0:
            return 1.0
        return min(1.0, runner.iter / length)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        setter = getattr(model, "set_distill_scale", None)
        if setter is None:
            raise TypeError(
                f"DistillWeightWarmupHook needs a SelfDistillClassifier model, got {type(model).__name__}; "
                "set model=dict(type='SelfDistillClassifier') or remove the hook."
            )
        setter(self.scale_at(runner))
