"""Let torch >= 2.6 (``weights_only=True`` by default) load mmengine checkpoints.

mmengine pickles a few of its own objects (the message hub's ``HistoryBuffer``,
numpy scalars in logs) into checkpoints; torch's safe unpickler refuses them, so
``resume=True`` and ``load_from`` fail with "Unsupported global". Registering
them as safe globals fixes that without turning the safe loader off.
"""

from __future__ import annotations

import codecs
import collections
from typing import Any, List

import numpy as np
import torch

__all__ = ["register_mmengine_safe_globals"]


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


def register_mmengine_safe_globals() -> None:
    """Add mmengine's checkpoint objects to torch's allow-list (idempotent)."""
    if not hasattr(torch.serialization, "add_safe_globals"):
        return
    from mmengine.logging import HistoryBuffer
    from mmengine.logging.message_hub import MessageHub

    torch.serialization.add_safe_globals([HistoryBuffer, MessageHub, *_numpy_globals(), *_resume_globals()])


def _resume_globals() -> List[Any]:
    """Objects in the checkpoints that ``resume=True`` reads back.

    ``collections.Counter``: ``MultiStepLR``'s milestones in the scheduler state. ``getattr``: the message
    hub pickles ``HistoryBuffer``'s statistics methods as ``getattr(HistoryBuffer, 'min')``. The unpickler
    still calls only allow-listed callables, so ``getattr`` can fetch attributes but not call them.
    """
    return [collections.Counter, getattr]
