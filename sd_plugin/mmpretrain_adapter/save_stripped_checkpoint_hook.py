"""``SaveStrippedCheckpointHook``: next to every checkpoint, one that the original config loads."""

from __future__ import annotations

import os.path as osp
from typing import Any, Dict, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS

from sd_plugin._io import atomic_save
from sd_plugin.deploy.strip import strip_state_dict

__all__ = ["SaveStrippedCheckpointHook"]


@HOOKS.register_module()
class SaveStrippedCheckpointHook(Hook):
    """Whenever a checkpoint is saved, also write ``<name>_stripped.pth`` without the exits.

    The stripped file holds ``{'meta': ..., 'state_dict': ...}`` with only the
    original ImageClassifier's weights, so the user's config without the
    ``SelfDistillClassifier`` lines loads it with ``strict=True`` (``load_from``,
    ``tools/test.py``, ``mmpretrain.apis``) and predicts exactly as the deepest exit.
    Optimizer and scheduler states are left out. mmengine 0.10 has no
    ``after_save_checkpoint`` point, so the file is written in
    ``before_save_checkpoint``, named after the path the ``CheckpointHook`` is about
    to write (``last_ckpt`` in the message hub); the ``CheckpointHook``'s
    ``max_keep_ckpts`` does not delete stripped files.

    Args:
        suffix: Added to the checkpoint's file name before ``.pth``.

    Example:
        >>> custom_hooks = [dict(type='SaveStrippedCheckpointHook')]
    """

    priority = "VERY_LOW"

    def __init__(self, suffix: str = "_stripped") -> None:
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"suffix must be a non-empty string (e.g. '_stripped'), got {suffix!r}.")
        self.suffix = suffix
        self.last_path: Optional[str] = None

    def before_save_checkpoint(self, runner: Any, checkpoint: Dict[str, Any]) -> None:
        """Write the stripped copy of the checkpoint that is being saved."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not hasattr(model, "num_exits"):
            raise TypeError(
                f"SaveStrippedCheckpointHook needs a self-distillation model, got {type(model).__name__}; "
                "set model.type='SelfDistillClassifier' or remove the hook."
            )
        target = runner.message_hub.get_info("last_ckpt")
        if not target:
            target = osp.join(runner.work_dir, f"epoch_{runner.epoch + 1}.pth")
        root, ext = osp.splitext(target)
        path = f"{root}{self.suffix}{ext or '.pth'}"
        meta = dict(checkpoint.get("meta") or {})
        meta["sd_plugin_stripped"] = True
        state = strip_state_dict(checkpoint["state_dict"])
        if runner.rank == 0:
            atomic_save({"meta": meta, "state_dict": state}, path)
            runner.logger.info(f"Saved the checkpoint without exits to {path}")
        self.last_path = path
