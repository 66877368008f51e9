"""Let torch >= 2.6 (``weights_only=True`` by default) load mmengine checkpoints, and nothing else.

mmengine pickles a few of its own objects into checkpoints (the message hub's
``HistoryBuffer`` with its statistics methods, numpy scalars and arrays in the
logs, ``collections.Counter`` milestones in scheduler states); torch's safe
unpickler refuses them, so ``resume=True`` and ``load_from`` fail with
"Unsupported global". Among the objects needed is ``builtins.getattr``:
``HistoryBuffer``'s statistics methods are pickled as ``getattr(HistoryBuffer, 'min')``.
Allowing ``getattr`` for the whole process would let any later
``torch.load(..., weights_only=True)`` hand back whatever built-in a file names
(``getattr(getattr, '__self__')`` is the ``builtins`` module), so the allowance
is *scoped*: :func:`mmengine_safe_globals` adds the objects only while a load
that needs them runs, and :func:`install_scoped_mmengine_loader` wraps
mmengine's local-file checkpoint loader (the one ``Runner.resume``,
``Runner.load_checkpoint`` and ``load_from`` go through) in that context, using
mmengine's own extension point (``CheckpointLoader.register_scheme``).

The allow-list is process-global in torch, so a ``weights_only`` load running in
another thread *during* an mmengine checkpoint load sees the wider list; loads
before and after do not.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import functools
import os
import pickle
import threading
from typing import Any, Callable, Iterator, List, Union

import numpy as np
import torch

__all__ = [
    "mmengine_safe_globals",
    "install_scoped_mmengine_loader",
    "mmengine_checkpoint_globals",
    "load_checkpoint_file",
    "refuse_unsafe_checkpoint",
]

_LOCK = threading.RLock()
_DEPTH = 0
_ADDED: List[Any] = []


def _numpy_globals() -> List[Any]:
    found: List[Any] = [np.dtype, codecs.encode]
    try:
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[attr-defined]
    except ImportError:  # numpy >= 2 moved them
        from numpy._core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    found += [_reconstruct, scalar, np.ndarray]
    for name in ("float64", "float32", "int64", "int32", "bool_"):
        found.append(getattr(np, name))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                found.append(getattr(dtypes, name))
    return found


def _sharded_tensor_globals() -> List[Any]:
    """torch's own classes in FSDP's sharded checkpoints (mmengine ``FlexibleRunner`` + ``FSDPStrategy``)."""
    try:
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor.api import ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import (
            MEM_FORMAT_ENCODING,
            ShardedTensorMetadata,
            TensorProperties,
        )
        from torch.distributed._shard.sharded_tensor.shard import Shard
        from torch.distributed._shard.sharding_spec.api import EnumerableShardingSpec
        from torch.distributed._shard.sharding_spec.chunk_sharding_spec import ChunkShardingSpec
        from torch.distributed.remote_device import _remote_device
    except ImportError:  # torch built without distributed support
        return []
    return [
        ShardedTensor,
        ShardedTensor.ProcessGroupState,
        Shard,
        ShardMetadata,
        ShardedTensorMetadata,
        TensorProperties,
        MEM_FORMAT_ENCODING,
        _remote_device,
        EnumerableShardingSpec,
        ChunkShardingSpec,
    ]


def mmengine_checkpoint_globals() -> List[Any]:
    """Everything an mmengine training checkpoint (``resume=True``) pickles besides tensors."""
    found: List[Any] = [collections.Counter, getattr, *_numpy_globals(), *_sharded_tensor_globals()]
    try:
        from mmengine.logging import HistoryBuffer
        from mmengine.logging.message_hub import MessageHub
    except ImportError:  # a timm-only install: no mmengine objects can be in the file
        return found
    return [HistoryBuffer, MessageHub, *found]


@contextlib.contextmanager
def mmengine_safe_globals() -> Iterator[None]:
    """Allow mmengine's checkpoint objects in ``weights_only`` loads inside this block only.

    Re-entrant and safe to nest from several threads: the objects are added by the
    outermost block and removed when the last block exits; objects the user had
    already allowed themselves are left allowed.
    """
    global _DEPTH
    if not hasattr(torch.serialization, "get_safe_globals"):  # torch < 2.4: no allow-list
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            present = set(map(id, torch.serialization.get_safe_globals()))
            _ADDED[:] = [g for g in mmengine_checkpoint_globals() if id(g) not in present]
            torch.serialization.add_safe_globals(list(_ADDED))
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _remove(_ADDED)
                _ADDED.clear()


def load_checkpoint_file(
    path: Union[str, os.PathLike[str]], option: str = "checkpoint", mmengine_objects: bool = True
) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``, with errors that name the file.

    Args:
        path: The checkpoint file.
        option: How the user gave it (e.g. ``'--resume'``), for the messages.
        mmengine_objects: Also accept mmengine's checkpoint objects (message hub, numpy scalars), for this load
            only; False reads tensors and plain data alone (timm checkpoints, sd_plugin's own files).

    A file that names other Python objects is refused with a ValueError (its code never runs); a damaged file
    raises a ValueError naming it and the newest intact checkpoint next to it.
    """
    from ._io import explain_unreadable_checkpoint

    with mmengine_safe_globals() if mmengine_objects else contextlib.nullcontext():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise refuse_unsafe_checkpoint(path, err, option) from err
        except (RuntimeError, EOFError, ValueError) as err:
            if not os.path.isfile(path):
                raise
            raise explain_unreadable_checkpoint(path, err, option) from err


def refuse_unsafe_checkpoint(
    path: Union[str, os.PathLike[str]], err: BaseException, option: str = "checkpoint"
) -> ValueError:
    """The ValueError for a file that torch's safe unpickler refused: it names objects that are not data.

    Such a file could run code if torch's full unpickler read it; sd_plugin reads every file with the safe one.
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint: torch's own message is all there is
        found = []
    what = ", ".join(found) if found else (str(err).splitlines() or [""])[-1].strip()
    return ValueError(
        f"{option} {str(path)!r} is refused: it holds Python objects that are not tensors or plain data ({what}), "
        "and loading them could run code from the file. sd_plugin reads checkpoints as data only "
        "(torch.load(..., weights_only=True)). Use a checkpoint written by sd_plugin, timm or mmengine; if you made "
        "this file yourself, save plain state dicts (tensors, numbers, strings, lists, dicts) instead."
    )


def _remove(objs: List[Any]) -> None:
    from torch import _weights_only_unpickler as wou

    remove = getattr(wou, "_remove_safe_globals", None)
    if remove is not None:
        remove(objs)
        return
    keep = [g for g in torch.serialization.get_safe_globals() if all(g is not o for o in objs)]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(keep)


def _scoped(loader: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(loader)  # keeps the name 'load_from_local', which mmengine prints
    def load(filename: str, map_location: Any = None) -> Any:
        from ._io import explain_unreadable_checkpoint

        with mmengine_safe_globals():
            try:
                return loader(filename, map_location)
            except pickle.UnpicklingError as err:
                raise refuse_unsafe_checkpoint(os.path.expanduser(filename), err) from err
            except (RuntimeError, EOFError, OSError, ValueError) as err:
                if isinstance(err, FileNotFoundError) or not os.path.isfile(os.path.expanduser(filename)):
                    raise
                raise explain_unreadable_checkpoint(os.path.expanduser(filename), err) from err

    load.sd_plugin_scoped = True  # type: ignore[attr-defined]
    return load


def install_scoped_mmengine_loader() -> None:
    """Wrap mmengine's local checkpoint loader so its loads (and only those) allow mmengine's objects.

    Idempotent. Unreadable files (cut short, corrupt) raise a ValueError that names
    the file and the newest intact checkpoint next to it.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    current = CheckpointLoader._get_checkpoint_loader("")
    if current is None or getattr(current, "sd_plugin_scoped", False):
        return
    CheckpointLoader.register_scheme(prefixes="", loader=_scoped(current), force=True)
