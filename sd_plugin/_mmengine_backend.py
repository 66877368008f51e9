"""``AtomicLocalBackend``: mmengine's local file backend with crash-safe writes.

mmengine's ``LocalBackend.put`` opens the checkpoint file for writing (truncating
it) and streams into it, so a process killed while saving leaves a cut-short
``iter_N.pth``. This backend writes through :func:`sd_plugin._io.atomic_write`
(temporary file in the same folder, fsync, ``os.replace``): a checkpoint file is
either absent or complete. Registered as ``'sd_atomic_local'``; ``sd-plugin train``
gives it to the ``CheckpointHook`` (``backend_args=dict(backend='sd_atomic_local')``)
unless the config names a backend of its own.
"""

from __future__ import annotations

import os.path as osp
from pathlib import Path
from typing import Union

import mmengine
from mmengine.fileio import register_backend
from mmengine.fileio.backends import LocalBackend

from ._io import atomic_write

__all__ = ["AtomicLocalBackend", "ATOMIC_BACKEND"]

ATOMIC_BACKEND = "sd_atomic_local"


class AtomicLocalBackend(LocalBackend):
    """Local files; ``put`` and ``put_text`` replace the destination only once the new file is complete."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        mmengine.mkdir_or_exist(osp.dirname(str(filepath)))
        with atomic_write(filepath, "wb") as f:
            f.write(obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = "utf-8") -> None:
        self.put(obj.encode(encoding), filepath)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)
