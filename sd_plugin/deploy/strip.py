"""Strip the exits from a self-distillation checkpoint: the user's original model loads it with ``strict=True``.

The deepest classifier *is* the original model, so stripping only drops the exit
weights. Which keys those are, each adapter model declares in its class attribute
``exit_state_prefixes`` (timm's ``SelfDistillModel``: ``sd_exits.``; MMPretrain's
``SelfDistillClassifier``: its exit necks, exit heads and distillation loss); a
checkpoint file is stripped of the prefixes of every adapter installed. On the command line:
``sd-plugin strip IN.pth OUT.pth [--check-config ORIGINAL_CFG.py]``.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .._io import atomic_save
from .._safe_globals import load_checkpoint_file

__all__ = ["exit_state_prefixes", "strip_state_dict", "strip_checkpoint", "plain_state_dict", "check_against_config"]

_ADAPTER_MODELS = (
    ("sd_plugin.timm_adapter.model", "SelfDistillModel"),
    ("sd_plugin.mmpretrain_adapter.classifier", "SelfDistillClassifier"),
)
_PREFIX_PREFIXES = ("", "module.", "ema_", "ema_model.")


def exit_state_prefixes(model: Optional[nn.Module] = None) -> Tuple[str, ...]:
    """State-dict prefixes of the exits: ``model``'s own (``exit_state_prefixes``), else every adapter's."""
    if model is not None:
        prefixes = getattr(type(model), "exit_state_prefixes", None)
        if not prefixes:
            raise TypeError(
                f"{type(model).__name__} declares no exit_state_prefixes: pass the model from sd_plugin.wrap(...) "
                "or a SelfDistillClassifier."
            )
        return tuple(prefixes)
    out: List[str] = []
    for module_name, class_name in _ADAPTER_MODELS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError:  # that adapter's framework is not installed
            continue
        out.extend(p for p in cls.exit_state_prefixes if p not in out)
    return tuple(out)


def strip_state_dict(state_dict: Mapping[str, Any], prefixes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A copy of ``state_dict`` without the keys of the exits (order kept; default prefixes: every adapter's)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}.")
    if prefixes is None:
        prefixes = exit_state_prefixes()
    drops = tuple(outer + p for outer in _PREFIX_PREFIXES for p in prefixes)
    return OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(drops))


def plain_state_dict(model: nn.Module) -> Dict[str, Any]:
    """The original model's state dict from a live self-distillation model (DDP / mmengine wrappers unwrapped)."""
    from_wrapper = getattr(model, "module", None)
    if isinstance(from_wrapper, nn.Module) and not hasattr(model, "num_exits"):
        model = from_wrapper
    if not hasattr(model, "num_exits"):
        raise TypeError(
            f"{type(model).__name__} has no exits: pass the model from sd_plugin.wrap(...) or a SelfDistillClassifier."
        )
    return strip_state_dict(model.state_dict(), exit_state_prefixes(model))


def strip_checkpoint(
    src: Union[str, Path, Mapping[str, Any]], dst: Optional[Union[str, Path]] = None
) -> Dict[str, Any]:
    """Strip a checkpoint file (or loaded dict) and optionally save it.

    A dict with ``'state_dict'`` (mmengine, MMPretrain) keeps its ``'meta'`` (with
    ``'sd_plugin_stripped': True`` and the dropped key count added) and loses the
    optimizer, scheduler and message-hub state, which belong to the training run;
    a bare state dict stays bare.

    Args:
        src: Path of a checkpoint, or the loaded object.
        dst: Where to save the stripped checkpoint (``None``: do not save).

    Returns:
        The stripped checkpoint.
    """
    ckpt: Any = load_checkpoint_file(src) if isinstance(src, (str, Path)) else src
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"a checkpoint must be a dict, got {type(ckpt).__name__}.")
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        state = strip_state_dict(ckpt["state_dict"])
        meta = dict(ckpt.get("meta") or {})
        meta["sd_plugin_stripped"] = True
        meta["sd_plugin_dropped_keys"] = len(ckpt["state_dict"]) - len(state)
        out: Dict[str, Any] = {"meta": meta, "state_dict": state}
    else:
        out = strip_state_dict(ckpt)
    if len(out.get("state_dict", out)) == len(ckpt.get("state_dict", ckpt)):
        raise ValueError("the checkpoint has no exit weights to strip: is it a self-distillation checkpoint?")
    if dst is not None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(out, dst)
    return out


def check_against_config(stripped: Mapping[str, Any], config: str) -> None:
    """Build the original MMPretrain ``config`` (without sd_plugin) and load ``stripped`` into it strictly."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    import sd_plugin  # noqa: F401  (registers the components the config may name)

    cfg = Config.fromfile(config)
    if str(cfg.model.get("type", "")).endswith("SelfDistillClassifier"):
        raise ValueError(f"{config} builds a SelfDistillClassifier; give your original config, without sd_plugin.")
    model = MODELS.build(cfg.model)
    model.load_state_dict(stripped.get("state_dict", stripped), strict=True)
