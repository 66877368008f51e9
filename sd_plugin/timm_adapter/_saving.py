"""An exit set saved with its options, so it reloads without restating them (as PEFT saves an adapter's config).

``SelfDistillModel.save_exits(directory)`` writes the exits' weights (``exits.safetensors``, or ``exits.pth``: a
plain ``torch.save`` state dict) and ``sd_plugin_config.json``: the :class:`~sd_plugin.core.SelfDistillConfig`
options with the exit indices resolved, the exit points, the timm architecture, ``num_classes``, the probe input
size and the sd_plugin version. :func:`load_exits` wraps a plain timm model with those options, checks that it is
the model the exits were trained on, and loads the weights strictly. Reading is data only: JSON, safetensors, and
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from .._io import atomic_save, atomic_write, atomic_write_path
from ..core import SelfDistillConfig
from ..version import __version__
from ._discovery import _model_name

if TYPE_CHECKING:
    from .model import SelfDistillModel

__all__ = ["save_exits", "load_exits", "CONFIG_NAME", "SAFETENSORS_NAME", "TORCH_NAME"]

CONFIG_NAME = "sd_plugin_config.json"
SAFETENSORS_NAME = "exits.safetensors"
TORCH_NAME = "exits.pth"
FORMAT = "sd_plugin.exits"
FORMAT_VERSION = 1
#: Options that shape the exits' weights: fixed by the saved set, never overridden at load time.
STRUCTURAL_OPTIONS = ("exit_indices", "exit_hidden_ratio")
_REQUIRED_KEYS = ("format_version", "architecture", "num_classes", "input_size", "options", "exit_points", "weights")

PathLike = Union[str, "os.PathLike[str]"]
_SAME = "Create the model as it was when the exits were saved (same timm version and create_model arguments)."


def _have_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def _resolved_indices(sd_model: SelfDistillModel) -> Optional[List[int]]:
    """The exits' indices into the model's stage (or block) ends, as ``exit_indices`` takes them."""
    positions = list(sd_model.positions)
    modules = [p.module for p in sd_model.exit_points]
    if all(m in positions for m in modules):
        return [positions.index(m) for m in modules]
    given = sd_model.config.exit_indices
    return None if given is None else list(given)


def exit_set_config(sd_model: SelfDistillModel, weights: str) -> Dict[str, Any]:
    """What ``sd_plugin_config.json`` holds for ``sd_model``'s exits stored in the file ``weights``."""
    options = sd_model.config.to_dict()
    options["exit_indices"] = _resolved_indices(sd_model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sd_plugin_version": __version__,
        "architecture": _model_name(sd_model.model),
        "num_classes": int(sd_model.num_classes),
        "feature_dim": int(sd_model.feature_dim),
        "input_size": [int(s) for s in sd_model.input_size],
        "options": options,
        "exit_points": [
            {"module": p.module, "fmt": p.fmt, "channels": int(p.channels), "stride": int(p.stride)}
            for p in sd_model.exit_points
        ],
        "weights": weights,
    }


def save_exits(sd_model: SelfDistillModel, directory: PathLike, safe_serialization: Optional[bool] = None) -> Path:
    """Write ``sd_model``'s exit weights and ``sd_plugin_config.json`` to ``directory`` (created if missing).

    Args:
        sd_model: The wrapped model.
        directory: Folder to write to; files of an earlier save there are replaced.
        safe_serialization: ``True``: safetensors (``exits.safetensors``); ``False``: ``torch.save``
            (``exits.pth``); ``None``: safetensors when it is installed.

    Returns:
        The path of ``sd_plugin_config.json``.
    """
    if sd_model.num_classes == 0:
        raise ValueError(
            "save_exits(): this model has no classifiers (reset_classifier(0) removed them), so there is no exit set "
            "to reload. Call reset_classifier(num_classes) and train the exits before saving them."
        )
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_exits(): {str(folder)!r} is a file; give a directory (it is created if missing).")
    use_safetensors = _have_safetensors() if safe_serialization is None else bool(safe_serialization)
    if use_safetensors and not _have_safetensors():
        raise ValueError("save_exits(safe_serialization=True) needs safetensors: pip install safetensors.")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in sd_model.exits_state_dict().items()}
    if use_safetensors:
        from safetensors.torch import save_file

        with atomic_write_path(folder / SAFETENSORS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    else:
        atomic_save(state, folder / TORCH_NAME)
    config_path = folder / CONFIG_NAME  # written last: a folder with a config holds its complete weights
    with atomic_write(config_path, "w") as f:
        json.dump(exit_set_config(sd_model, SAFETENSORS_NAME if use_safetensors else TORCH_NAME), f, indent=2)
        f.write("\n")
    return config_path


def _read_config(folder: Path) -> Dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"load_exits(): {str(folder)!r} has no {CONFIG_NAME}, so it holds no saved exit set. Save one with "
            "sd_model.save_exits(directory) (sd-plugin train-timm writes one beside its exits.pth); for a bare "
            "exits state dict use sd_model.load_exits_state_dict()."
        )
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"load_exits(): {str(path)!r} is not valid JSON ({err}); save the exits again.") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"load_exits(): {str(path)!r} is not an sd_plugin exit-set config (no format {FORMAT!r}).")
    missing = [k for k in _REQUIRED_KEYS if k not in saved]
    if missing:
        raise ValueError(f"load_exits(): {str(path)!r} lacks {missing}; save the exits again with save_exits().")
    if saved["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"load_exits(): {str(path)!r} has format version {saved['format_version']!r} (sd_plugin "
            f"{saved.get('sd_plugin_version')}); this sd_plugin ({__version__}) reads version {FORMAT_VERSION}. "
            "Install the sd_plugin version that saved it."
        )
    if saved["weights"] not in (SAFETENSORS_NAME, TORCH_NAME):
        raise ValueError(
            f"load_exits(): {str(path)!r} names weights {saved['weights']!r}; expected {SAFETENSORS_NAME!r} or "
            f"{TORCH_NAME!r} in the same directory."
        )
    return saved


def _check_model(model: nn.Module, saved: Mapping[str, Any], folder: Path) -> None:
    arch, classes = _model_name(model), getattr(model, "num_classes", None)
    problems = []
    if arch != saved["architecture"]:
        problems.append(f"architecture {arch!r}, not {saved['architecture']!r}")
    if classes != saved["num_classes"]:
        problems.append(f"{classes} classes, not {saved['num_classes']}")
    if problems:
        raise ValueError(
            f"load_exits(): the exits in {str(folder)!r} were trained on {saved['architecture']!r} with "
            f"{saved['num_classes']} classes, but this model has {' and '.join(problems)}. Create the model they "
            f"belong to: timm.create_model({saved['architecture']!r}, num_classes={saved['num_classes']})."
        )


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"load_exits(): {str(path)!r} is missing; its {CONFIG_NAME} names it. Save the exits again.")
    if path.name == SAFETENSORS_NAME:
        if not _have_safetensors():
            raise ValueError(f"load_exits(): {str(path)!r} is a safetensors file: pip install safetensors.")
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    from .._safe_globals import load_checkpoint_file

    state = load_checkpoint_file(path, "exit weights", mmengine_objects=False)  # torch.load(weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_exits(): {str(path)!r} is not a state dict of tensors; save the exits again.")
    return state


def _check_keys(sd_model: SelfDistillModel, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = sd_model.exits_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: saved {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"load_exits(): the weights in {str(path)!r} do not fit the exits built from its config (missing "
            f"{missing}, unexpected {unexpected}, other shapes {shapes}). {_SAME}"
        )


def load_exits(model: nn.Module, directory: PathLike, **options: Any) -> SelfDistillModel:
    """Wrap a plain timm model with an exit set saved by ``SelfDistillModel.save_exits`` (or ``sd-plugin train-timm``).

    Args:
        model: The timm model the exits were trained on (same architecture, same ``num_classes``), with its own
            weights loaded (e.g. ``model_plain.pth`` of ``sd-plugin train-timm``).
        directory: The folder holding ``sd_plugin_config.json`` and the exits' weights.
        **options: Options to change from the saved ones that shape no weight (``predict_exit='ensemble'``, the
            loss weights, ...); ``exit_indices`` and ``exit_hidden_ratio`` come from the saved set.

    Returns:
        The :class:`SelfDistillModel` with the saved options and exit weights.
    """
    from .model import SelfDistillModel

    if isinstance(model, SelfDistillModel):
        raise TypeError(
            "load_exits() wraps a plain timm model, and this one is already wrapped: pass sd_plugin.unwrap(model), "
            "or load weights alone with model.load_exits_state_dict()."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_exits() needs a timm model (torch.nn.Module), got {type(model).__name__}.")
    valid = set(SelfDistillConfig.option_names()) - set(STRUCTURAL_OPTIONS)
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(
            f"load_exits() got option(s) {unknown} it cannot change; {list(STRUCTURAL_OPTIONS)} are fixed by the "
            f"saved weights. Valid options: {sorted(valid)}."
        )
    folder = Path(directory)
    saved = _read_config(folder)
    _check_model(model, saved, folder)
    stored = dict(saved["options"])
    unknown = sorted(set(stored) - set(SelfDistillConfig.option_names()))
    if unknown:
        raise ValueError(
            f"load_exits(): {CONFIG_NAME} in {str(folder)!r} has options {unknown} that this sd_plugin ({__version__}) "
            f"does not know (saved by sd_plugin {saved.get('sd_plugin_version')}); install that version."
        )
    config = SelfDistillConfig(**{**stored, **options})
    weights = folder / saved["weights"]
    state = _read_weights(weights)
    try:
        sd_model = SelfDistillModel(model, config, input_size=saved["input_size"])
    except ValueError as err:  # e.g. a saved exit index beyond this model's depth
        raise ValueError(f"load_exits(): the exits in {str(folder)!r} do not fit this model ({err}). {_SAME}") from err
    try:
        _check_points(sd_model, saved, folder)
        _check_keys(sd_model, state, weights)
    except ValueError:
        sd_model.unwrap()  # the model is handed back as it came, without taps
        raise
    sd_model.load_exits_state_dict(state, strict=True)
    return sd_model


def _check_points(sd_model: SelfDistillModel, saved: Mapping[str, Any], folder: Path) -> None:
    found = [p.module for p in sd_model.exit_points]
    wanted = [p.get("module") if isinstance(p, dict) else p for p in saved["exit_points"]]
    if found != wanted:
        raise ValueError(
            f"load_exits(): the exits in {str(folder)!r} read {wanted}, but on this model the same options place "
            f"them at {found}. {_SAME}"
        )
