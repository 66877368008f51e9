"""``SaveStrippedCheckpointHook``: next to every checkpoint, one that the original config loads."""

from __future__ import annotations

import os
import os.path as osp
from typing import Any, Dict, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from sd_plugin._io import atomic_save
from sd_plugin.deploy.strip import strip_state_dict

from ..registry import HOOKS

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
    to write: the ``CheckpointHook`` records that path in the message hub
    (``last_ckpt`` for the regular checkpoints, ``best_ckpt``/``best_ckpt_<metric>``
    for ``save_best``) just before saving, so the entry that changed since the last
    save names the file. When a new best checkpoint replaces the old one, the old
    one's stripped copy is removed too; the ``CheckpointHook``'s ``max_keep_ckpts``
    does not delete stripped copies of regular checkpoints.

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
        self._seen: Dict[str, str] = {}

    def before_train(self, runner: Any) -> None:
        self._seen = self._targets(runner)  # after a resume the hub already holds the old paths

    @staticmethod
    def _targets(runner: Any) -> Dict[str, str]:
        info = runner.message_hub.runtime_info
        return {k: str(v) for k, v in info.items() if (k == "last_ckpt" or k.startswith("best_ckpt")) and v}

    def _stripped_name(self, target: str) -> str:
        root, ext = osp.splitext(target)
        return f"{root}{self.suffix}{ext or '.pth'}"

    def before_save_checkpoint(self, runner: Any, checkpoint: Dict[str, Any]) -> None:
        """Write the stripped copy of the checkpoint that is being saved."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not hasattr(model, "num_exits"):
            raise TypeError(
                f"SaveStrippedCheckpointHook needs a self-distillation model, got {type(model).__name__}; "
                "set model.type='SelfDistillClassifier' or remove the hook."
            )
        current = self._targets(runner)
        changed = [k for k, v in current.items() if self._seen.get(k) != v]
        replaced = [self._seen[k] for k in changed if k.startswith("best_ckpt") and k in self._seen]
        self._seen = current
        target = current[changed[-1]] if changed else current.get("last_ckpt")
        if not target:
            target = osp.join(runner.work_dir, f"epoch_{runner.epoch + 1}.pth")
        path = self._stripped_name(target)
        meta = dict(checkpoint.get("meta") or {})
        meta["sd_plugin_stripped"] = True
        state = strip_state_dict(checkpoint["state_dict"])
        if runner.rank == 0:
            atomic_save({"meta": meta, "state_dict": state}, path)
            runner.logger.info(f"Saved the checkpoint without exits to {path}")
            for old in replaced:  # mmengine has just removed the previous best checkpoint
                if osp.isfile(self._stripped_name(old)):
                    os.remove(self._stripped_name(old))
        self.last_path = path
