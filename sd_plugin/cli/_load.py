"""What the subcommands share: a self-distillation model rebuilt from a user's checkpoint.

Two sources of models:

- a timm checkpoint: ``checkpoint-last.pth`` of ``sd-plugin train-timm`` (its ``'arch'`` and ``'args'`` say how
  to rebuild the model), or the state dict of ``sd_plugin.wrap(...)`` saved from one's own loop (``--timm-model``
  names the architecture);
- an MMPretrain config with ``model.type='SelfDistillClassifier'`` (``--config``) and a checkpoint of it; only
  this path imports mmengine and mmpretrain.

Every checkpoint is read by :func:`sd_plugin._safe_globals.load_checkpoint_file` (``weights_only=True``): a
file that asks to run code is refused.
"""

from __future__ import annotations

import argparse
import copy
import os.path as osp
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._safe_globals import load_checkpoint_file

__all__ = [
    "Loaded",
    "add_model_args",
    "add_progress_arg",
    "plain_doc",
    "help_kwargs",
    "build_mm_model",
    "create_timm",
    "timm_arch",
    "load_model",
    "read_checkpoint",
    "state_dict_of",
    "num_classes_from_exits",
]

#: Keys of the exit classifiers in the state dict of ``sd_plugin.wrap(...)``: their rows are the classes.
EXIT_FC_KEY = re.compile(r"^sd_exits\.\d+\.fc\.weight$")
#: The MMPretrain pipeline steps whose size options fix the input size, in the order they apply.
MM_SIZE_KEYS = ("scale", "crop_size")
RGB_CHANNELS = 3
#: How much of a long load_state_dict error (every missing key) an error message quotes.
ERROR_DETAIL_CHARS = 300


@dataclass
class Loaded:
    """A model with exits ready for inference, and how images reach it.

    Attributes:
        model: The model with exits, in eval mode, on ``device``.
        name: A short name (the timm architecture or the config's file name).
        source: ``'timm'`` or ``'mmpretrain'``.
        input_size: (3, H, W) the model takes, where known.
        image_transform: PIL image to tensor, for ImageFolder data.
        to_inputs: A batch of ``image_transform`` outputs to model inputs (MMPretrain: its data preprocessor).
        device: Where the model runs.
        mm_cfg: The MMPretrain config (``None`` for timm).
    """

    model: nn.Module
    name: str
    source: str
    input_size: Optional[Tuple[int, int, int]]
    image_transform: Callable[[Any], torch.Tensor]
    to_inputs: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    mm_cfg: Any = None

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A random input batch in the model's input space (for tracing and FLOP counting)."""
        if self.input_size is None:
            raise ValueError(f"the input size of {self.name} is not known: give --img-size.")
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.input_size, generator=gen).to(self.device)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model source: a checkpoint, and an MMPretrain config or what a bare timm state dict leaves unsaid."""
    p.add_argument("checkpoint", help="self-distillation checkpoint (sd-plugin train-timm's, or MMPretrain's)")
    g = p.add_argument_group("model")
    g.add_argument("--config", help="MMPretrain config with model.type='SelfDistillClassifier' (the checkpoint's)")
    g.add_argument("--timm-model", help="timm architecture, for a checkpoint that does not name it")
    g.add_argument("--num-classes", type=int, help="timm: classes (default: read from the checkpoint)")
    g.add_argument("--exit-indices", type=int, nargs="+", help="timm: the exits' stage indices (default: saved)")
    g.add_argument("--img-size", type=int, help="input size (default: the checkpoint's or the config's)")
    g.add_argument("--mean", type=float, nargs=RGB_CHANNELS, help="timm: normalisation mean (default: the model's)")
    g.add_argument("--std", type=float, nargs=RGB_CHANNELS, help="timm: normalisation std (default: the model's)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def plain_doc(doc: Optional[str]) -> str:
    """A docstring as ``--help`` prints it: reST roles and literals as plain text."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "")


def help_kwargs(doc: Optional[str], epilog: str) -> Dict[str, Any]:
    """A subcommand parser's description (its module docstring as plain text) and its examples."""
    return dict(description=plain_doc(doc), epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def read_checkpoint(path: str, option: str = "checkpoint") -> Mapping[str, Any]:
    """The checkpoint at ``path``, loaded with ``weights_only=True``; a dict or a ValueError."""
    if not osp.isfile(path):
        raise FileNotFoundError(f"{option} {path!r} does not exist.")
    ckpt = load_checkpoint_file(path, option)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{option} {path!r} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict.")
    return ckpt


def state_dict_of(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """The model weights of a checkpoint (``ckpt['state_dict']`` or the dict itself), a DDP ``module.`` dropped."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint holds no state dict (a 'state_dict' entry or a dict of tensors).")
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def num_classes_from_exits(state: Mapping[str, Any]) -> Optional[int]:
    """Rows of the exit classifiers of ``sd_plugin.wrap(...)``'s state dict (``None``: no exit found)."""
    rows = {int(v.shape[0]) for k, v in state.items() if EXIT_FC_KEY.match(k)}
    return rows.pop() if len(rows) == 1 else None


def load_model(args: argparse.Namespace) -> Loaded:
    """The model with exits named by the model arguments (:func:`add_model_args`), weights loaded strictly."""
    ckpt = read_checkpoint(args.checkpoint)
    device = torch.device(args.device)
    if args.config:
        return _load_mmpretrain(args, ckpt, device)
    return _load_timm(args, ckpt, device)


def _saved_args(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    saved = ckpt.get("args")
    return saved if isinstance(saved, Mapping) else {}


def create_timm(arch: str, num_classes: int, img_size: Optional[int]) -> nn.Module:
    """``timm.create_model`` as ``sd-plugin train-timm`` calls it: at ``img_size`` when the model takes one."""
    import timm

    if img_size:
        try:
            return timm.create_model(arch, num_classes=num_classes, img_size=img_size)
        except TypeError:
            pass  # a fully convolutional model: takes any size
    return timm.create_model(arch, num_classes=num_classes)


def timm_arch(args: argparse.Namespace, ckpt: Mapping[str, Any]) -> str:
    arch = args.timm_model or ckpt.get("arch") or _saved_args(ckpt).get("model")
    if not isinstance(arch, str) or not arch:
        raise ValueError(
            f"{args.checkpoint} does not name a timm architecture (no 'arch' entry, as sd-plugin train-timm writes): "
            "give --timm-model NAME, or --config CONFIG for an MMPretrain checkpoint."
        )
    return arch


def _load_timm(args: argparse.Namespace, ckpt: Mapping[str, Any], device: torch.device) -> Loaded:
    try:
        from timm.data import create_transform, resolve_data_config
    except ImportError as err:
        raise ValueError(
            "a timm checkpoint needs timm: pip install 'sd-plugin[timm]' (or give --config for an MMPretrain one)."
        ) from err
    from ..core import SelfDistillConfig
    from ..timm_adapter import SelfDistillModel

    saved = _saved_args(ckpt)
    if saved.get("no_sd") or saved.get("sd_no_exits"):
        raise ValueError(f"{args.checkpoint} was trained without exits (--no-sd / --sd-no-exits): nothing to report.")
    arch = timm_arch(args, ckpt)
    state = state_dict_of(ckpt)
    num_classes = args.num_classes or saved.get("num_classes") or num_classes_from_exits(state)
    if not num_classes:
        raise ValueError(f"the number of classes of {args.checkpoint} is not known: give --num-classes.")
    img_size = args.img_size or saved.get("img_size")
    exit_indices = args.exit_indices if args.exit_indices is not None else saved.get("sd_exit_indices")
    ratio = saved.get("sd_exit_hidden_ratio", SelfDistillConfig().exit_hidden_ratio)
    size = (RGB_CHANNELS, int(img_size), int(img_size)) if img_size else None
    config = SelfDistillConfig(exit_indices=exit_indices, exit_hidden_ratio=ratio)
    model = SelfDistillModel(create_timm(arch, int(num_classes), img_size), config, size)
    _load_strict(model, state, args.checkpoint, "--timm-model/--num-classes/--exit-indices/--img-size")
    data_cfg = resolve_data_config(dict(input_size=size) if size else {}, model=model)
    if args.mean or args.std:
        if not (args.mean and args.std):
            raise ValueError("give --mean and --std together.")
        data_cfg.update(mean=tuple(args.mean), std=tuple(args.std))
    transform = create_transform(**data_cfg, is_training=False)
    input_size = tuple(int(s) for s in data_cfg["input_size"])
    return Loaded(
        model=model.to(device).eval(),
        name=arch,
        source="timm",
        input_size=(input_size[0], input_size[1], input_size[2]),
        image_transform=transform,
        to_inputs=lambda x: x.to(device),
        device=device,
    )


def _load_strict(model: nn.Module, state: Mapping[str, Any], path: str, options: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        if len(detail) > ERROR_DETAIL_CHARS:
            detail = detail[:ERROR_DETAIL_CHARS] + " ..."
        raise ValueError(f"{path} does not fit the model built for it ({detail}): check {options}.") from err


def _pipeline_size(cfg: Any, split: str) -> Tuple[Optional[int], Optional[int]]:
    """(resize, crop) of the config's ``split`` pipeline: the short side it resizes to and the crop it takes."""
    loader = cfg.get(f"{split}_dataloader") or {}
    steps = (loader.get("dataset") or {}).get("pipeline") or []
    found: Dict[str, Optional[int]] = {k: None for k in MM_SIZE_KEYS}
    for step in steps:
        for key in MM_SIZE_KEYS:
            value = step.get(key)
            if isinstance(value, (list, tuple)):
                value = min(value)
            if isinstance(value, int):
                found[key] = value
    return found["scale"], found["crop_size"]


def build_mm_model(config: str) -> Tuple[nn.Module, Any]:
    """The model of an MMPretrain config, built as mmengine's Runner builds it (with the config's data
    preprocessor), and the config."""
    try:
        from mmengine.config import Config
        from mmpretrain.registry import MODELS
    except ImportError as err:
        raise ValueError("an MMPretrain config needs MMPretrain: pip install 'sd-plugin[mmpretrain]'.") from err

    cfg = Config.fromfile(config)
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get("data_preprocessor") is not None:
        model_cfg.setdefault("data_preprocessor", cfg.data_preprocessor)
    return MODELS.build(model_cfg), cfg


def _load_mmpretrain(args: argparse.Namespace, ckpt: Mapping[str, Any], device: torch.device) -> Loaded:
    model, cfg = build_mm_model(args.config)
    from torchvision import transforms as T

    from ..mmpretrain_adapter.classifier import SelfDistillClassifier

    if not isinstance(model, SelfDistillClassifier):
        raise ValueError(
            f"{args.config} builds a {type(model).__name__}, not a SelfDistillClassifier: give the config the "
            "checkpoint was trained with (the one with model=dict(type='SelfDistillClassifier'))."
        )
    _load_strict(model, state_dict_of(ckpt), args.checkpoint, "that --config is the checkpoint's")
    model = model.to(device).eval()
    resize, crop = _pipeline_size(cfg, "test")
    size = args.img_size or crop or resize
    steps: List[Any] = [T.Resize(resize or size), T.CenterCrop(size)] if size else []
    # PIL reads RGB; MMPretrain's pipelines read BGR and the data preprocessor converts (to_rgb) from there.
    transform = T.Compose([*steps, T.PILToTensor(), T.Lambda(lambda x: x.flip(0))])

    def to_inputs(x: torch.Tensor) -> torch.Tensor:
        return model.data_preprocessor({"inputs": x.to(device)}, False)["inputs"]

    return Loaded(
        model=model,
        name=Path(args.config).stem,
        source="mmpretrain",
        input_size=(RGB_CHANNELS, size, size) if size else None,
        image_transform=transform,
        to_inputs=to_inputs,
        device=device,
        mm_cfg=cfg,
    )
