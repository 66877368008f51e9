"""``ProgressiveSelfKDHook``: PS-KD's training progress and its past predictions in the checkpoint."""

from __future__ import annotations

from typing import Any

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..registry import HOOKS

__all__ = ["ProgressiveSelfKDHook"]

#: Checkpoint key of the past predictions (beside ``state_dict``, so the model weights stay plain).
CHECKPOINT_KEY = "sd_plugin_pskd"


def _distill_loss(runner: Any) -> Any:
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    loss = getattr(model, "distill_loss", None)
    if loss is None or not hasattr(loss, "set_progress"):
        raise TypeError(
            f"ProgressiveSelfKDHook needs a SelfDistillClassifier model, got {type(model).__name__}; set "
            "model=dict(type='SelfDistillClassifier', pskd_alpha=0.8) or remove the hook."
        )
    return loss


@HOOKS.register_module()
class ProgressiveSelfKDHook(Hook):
    """Drives PS-KD (``SelfDistillClassifier(pskd_alpha=...)``) in mmengine's Runner.

    Before every training epoch it sets the progress ``epoch / max_epochs``
    (PS-KD's weight of the past prediction grows linearly with it); it saves the
    per-sample past predictions into every checkpoint and restores them on
    ``resume``, so a resumed run continues with the same targets.

    Example:
        >>> model = dict(type='SelfDistillClassifier', pskd_alpha=0.8)
        >>> custom_hooks = [dict(type='ProgressiveSelfKDHook')]
    """

    priority = "NORMAL"

    def before_train_epoch(self, runner: Any) -> None:
        loss = _distill_loss(runner)
        if loss.config.pskd_alpha <= 0:
            raise ValueError(
                "ProgressiveSelfKDHook is set but the model's pskd_alpha is 0 (PS-KD off): set "
                "model=dict(type='SelfDistillClassifier', pskd_alpha=0.8) or remove the hook."
            )
        loss.set_progress(min(1.0, runner.epoch / max(1, runner.max_epochs)))

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = _distill_loss(runner).method_state()

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        if CHECKPOINT_KEY in checkpoint:
            _distill_loss(runner).load_method_state(checkpoint[CHECKPOINT_KEY])
