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
from typing import IO, Any, Callable, Iterator, Optional, Union

import torch

__all__ = [
    "atomic_save",
    "atomic_write",
    "atomic_write_path",
    "check_checkpoint_file",
    "explain_unreadable_checkpoint",
    "newest_intact_checkpoint",
]

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


@contextlib.contextmanager
def atomic_write_path(path: PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix) for writers that want a file name; renamed on success.

    For writers that take a path rather than a file object (``torch.onnx.export``,
    ``matplotlib``'s ``savefig`` with the format taken from the suffix). On error
    the temporary file is removed and ``path`` keeps its old content.

    Example:
        >>> with atomic_write_path("model.onnx") as tmp:
        ...     torch.onnx.export(model, x, str(tmp))
    """
    dest = _check_destination(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    try:
        os.chmod(tmp_name, _file_mode(dest))
        yield Path(tmp_name)
        with open(tmp_name, "rb") as f:
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


def _problem(p: Path) -> Optional[str]:
    """Why ``p`` is not a complete, intact checkpoint file (None when it is). Reads the file once (CRC-32)."""
    if not p.is_file():
        return "no such checkpoint file"
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        return "is empty (0 bytes): it was never written completely"
    if head != b"PK\x03\x04":
        return None  # torch's legacy (non-zip) format: nothing to check cheaply
    if not zipfile.is_zipfile(p):
        return "is truncated (a zip archive without its end): it was cut short while being written"
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()  # CRC-32 of every record: torch itself does not check them
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"is damaged (unreadable zip archive: {err})"
    if bad is not None:
        return f"is damaged (the record {bad!r} fails its CRC check: the bytes changed after it was written)"
    return None


def newest_intact_checkpoint(
    folder: PathLike, exclude: Optional[PathLike] = None, pattern: str = "*.pth"
) -> Optional[Path]:
    """The most recently written file matching ``pattern`` in ``folder`` that is intact (temp files skipped)."""
    skip = Path(exclude).resolve() if exclude is not None else None
    found = [
        p
        for p in Path(folder).glob(pattern)
        if not p.name.startswith(".")  # atomic writers' temporary files
        and not p.stem.endswith("_stripped")  # SaveStrippedCheckpointHook's weights-only copies
        and p.resolve() != skip
        and _problem(p) is None
    ]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None


def _fallback_hint(p: Path, pattern: str) -> str:
    good = newest_intact_checkpoint(p.parent, exclude=p, pattern=pattern)
    if good is None:
        return f"There is no other intact checkpoint in {str(p.parent)!r}."
    return f"The newest intact checkpoint next to it is {str(good)!r}: resume from it with --resume {good}."


def explain_unreadable_checkpoint(
    path: PathLike, err: BaseException, option: str = "checkpoint", pattern: str = "*.pth"
) -> ValueError:
    """A ValueError for a checkpoint torch could not read: names the file, the cause and the last good one."""
    p = Path(path)
    first_line = str(err).splitlines()[0] if str(err) else ""
    cause = _problem(p) or f"is damaged: torch cannot read it ({type(err).__name__}: {first_line})"
    return ValueError(f"{option} {str(p)!r} {cause}. {_fallback_hint(p, pattern)}")


def check_checkpoint_file(path: PathLike, option: str = "checkpoint", pattern: str = "*.pth") -> None:
    """Raise ValueError when ``path`` is not an existing, complete checkpoint file.

    A file cut short (a crash while a non-atomic writer was saving it) still
    starts like a zip archive but has no central directory at its end; torch
    would fail later with "PytorchStreamReader failed reading zip archive".
    Files in torch's legacy (non-zip) format are let through. The message names
    the newest intact checkpoint in the same folder, if any.

    Args:
        path: The checkpoint file.
        option: How the user gave it (e.g. ``'--resume'``), for the message.
        pattern: Which files next to it are checkpoints of the same kind (for the fallback it names).
    """
    p = Path(path)
    problem = _problem(p)
    if problem is None:
        return
    if not p.is_file():
        raise ValueError(f"{option} {str(p)!r}: no such checkpoint file.")
    raise ValueError(f"{option} {str(p)!r} {problem}. Use the checkpoint before it. {_fallback_hint(p, pattern)}")
