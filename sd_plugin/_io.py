"""Crash-safe file writing: a checkpoint is either the old one or the complete new one.

``torch.save(obj, path)`` truncates ``path`` first and then streams into it, so a
crash, a full disk or a ``KeyboardInterrupt`` part-way leaves a file that loads
as "PytorchStreamReader failed reading zip archive". :func:`atomic_save` writes
to a temporary file in the destination folder (same file system, so the final
:func:`os.replace` is atomic on POSIX and Windows), flushes it to disk, and only
then renames it over the destination.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

import torch

__all__ = ["atomic_save", "atomic_write", "check_checkpoint_file"]

PathLike = Union[str, "os.PathLike[str]"]


def _check_destination(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
    dest = Path(path)
    if dest.is_dir():
        raise ValueError(f"{str(dest)!r} is a directory; give a file name such as {str(dest / 'model.pth')!r}.")
    if not dest.parent.is_dir():
        raise ValueError(f"the folder {str(dest.parent)!r} does not exist; create it first (e.g. mkdir -p).")
    return dest


def _file_mode(dest: Path) -> int:
    """The mode a plain ``open(dest, 'w')`` would give (mkstemp's files are private, 0o600)."""
    if dest.exists():
        return stat.S_IMODE(dest.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path``, on error it is removed.

    Args:
        path: Destination file. Its folder must exist.
        mode: ``'wb'`` or ``'w'``.

    Example:
        >>> with atomic_write("metrics.json", "w") as f:
        ...     json.dump(metrics, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}.")
    dest = _check_destination(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.chmod(tmp_name, _file_mode(dest))
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_save(obj: Any, path: PathLike, save_fn: Callable[[Any, IO[bytes]], None] = torch.save) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written file at ``path``.

    Args:
        obj: What to save (a state dict, an mmengine checkpoint dict, ...).
        path: Destination file; an existing file is replaced only once the new
            one is completely written.
        save_fn: Serializer called as ``save_fn(obj, file)`` (default :func:`torch.save`).
    """
    with atomic_write(path, "wb") as f:
        save_fn(obj, f)


def check_checkpoint_file(path: PathLike, option: str = "checkpoint") -> None:
    """Raise ValueError when ``path`` is not an existing, complete checkpoint file.

    A file cut short (a crash while a non-atomic writer was saving it) still
    starts like a zip archive but has no central directory at its end; torch
    would fail later with "PytorchStreamReader failed reading zip archive".
    Files in torch's legacy (non-zip) format are let through.

    Args:
        path: The checkpoint file.
        option: How the user gave it (e.g. ``'--resume'``), for the message.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{option} {str(p)!r}: no such checkpoint file.")
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{option} {str(p)!r} is empty (0 bytes): it was never written completely.")
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(p):
        raise ValueError(
            f"{option} {str(p)!r} is truncated (a zip archive without its end): it was cut short while being "
            "written. Use the checkpoint before it."
        )
