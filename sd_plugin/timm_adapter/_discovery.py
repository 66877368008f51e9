"""Finding where a timm model's stages end, and what their features look like.

Stage ends come from timm's own feature API (``model.feature_info``: module
name, channels and reduction of every feature level). A probe forward in eval
mode under ``no_grad`` then records, through forward hooks, the layout (NCHW,
NHWC or NLC tokens), width and spatial size of each of those outputs and of the
input of the model's own classifier, so nothing is hard-coded per architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core import ExitPoint, SelfDistillConfig, default_block_exits, default_stage_exits

__all__ = ["Discovery", "discover", "default_input_size", "pool_teacher"]


@dataclass(frozen=True)
class _Level:
    module: str
    num_chs: int
    reduction: int


@dataclass(frozen=True)
class Discovery:
    """What the probe found.

    Attributes:
        kind: 'stage' (stage-wise backbone) or 'block' (plain token backbone).
        positions: Module names of every stage (or block) end, shallowest first.
        points: The exit points chosen (relative to the timm model).
        teacher: Where the deepest classifier's input features are read.
        feature_dim: Width of the pooled teacher features.
        num_classes: Number of classes of the model's own classifier.
    """

    kind: str
    positions: Tuple[str, ...]
    points: Tuple[ExitPoint, ...]
    teacher: ExitPoint
    feature_dim: int
    num_classes: int


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) the model was built for: ``patch_embed.img_size``, ``img_size``, else timm's data config."""
    from timm.data import resolve_model_data_config

    cfg_size = tuple(resolve_model_data_config(model)["input_size"])
    chans = int(cfg_size[0])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        chans = int(first_conv.in_channels)
    for owner in (getattr(model, "patch_embed", None), model):
        size = getattr(owner, "img_size", None) if owner is not None else None
        if isinstance(size, int):
            return chans, size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return chans, int(size[0]), int(size[1])
    return chans, int(cfg_size[1]), int(cfg_size[2])


def _levels(model: nn.Module) -> List[_Level]:
    info = getattr(model, "feature_info", None)
    entries: Sequence[Any] = info if isinstance(info, (list, tuple)) else getattr(info, "info", None) or []
    levels: List[_Level] = []
    seen = set()
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("module"), str) or entry["module"] in seen:
            continue
        seen.add(entry["module"])
        levels.append(_Level(entry["module"], int(entry.get("num_chs", 0)), int(entry.get("reduction", 0))))
    if not levels:
        raise ValueError(
            f"{_model_name(model)} has no timm feature_info, so its intermediate features cannot be reached. "
            "Use a timm model that supports features_only=True (see timm.list_models()), or train it "
            "without self-distillation."
        )
    return levels


def _classifier(model: nn.Module) -> Tuple[str, nn.Module]:
    name = _model_name(model)
    if getattr(model, "num_classes", None) == 0:
        raise ValueError(
            f"{name} was created with num_classes=0 (no classifier): self-distillation needs the model's own "
            "classifier as the deepest exit. Create it with num_classes > 0, e.g. "
            f"timm.create_model('{name}', num_classes=10)."
        )
    if not hasattr(model, "get_classifier"):
        raise TypeError(f"{name} is not a timm classifier (it has no get_classifier()); pass a timm model.")
    head: Any = getattr(model, "get_classifier")()  # noqa: B009 - typed as a plain callable
    if isinstance(head, (tuple, list)) and len(head) > 0:
        head = head[0]  # (head, head_dist) of distilled models: the main head's input is the teacher
    if isinstance(head, nn.ModuleList) and len(head) > 0:
        head = head[-1]  # one head per branch or stage (CrossViT, EfficientViM): the deepest one
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise ValueError(
            f"{name} has no classifier (get_classifier() gives {type(head).__name__}); create it with num_classes > 0."
        )
    for mod_name, mod in model.named_modules():
        if mod is head:
            return mod_name, mod
    raise ValueError(f"{name}'s classifier is not one of its submodules; it cannot be tapped.")


def _layout(t: torch.Tensor, num_chs: int, prefer_nhwc: bool) -> Optional[Tuple[str, int]]:
    if t.dim() == 2:
        return "NC", int(t.shape[1])
    if t.dim() == 3:
        return "NLC", int(t.shape[2])
    if t.dim() != 4:
        return None
    nchw, nhwc = t.shape[1] == num_chs, t.shape[3] == num_chs
    if nhwc and (prefer_nhwc or not nchw):
        return "NHWC", int(t.shape[3])
    if nchw or not prefer_nhwc:
        return "NCHW", int(t.shape[1])
    return "NHWC", int(t.shape[3])


def _spatial(t: torch.Tensor, fmt: str) -> Optional[int]:
    if fmt == "NCHW":
        return int(t.shape[2])
    if fmt == "NHWC":
        return int(t.shape[1])
    return None


def pool_teacher(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """The classifier's input as (N, D) features: (N, C, 1, 1) flattens exactly, larger maps are averaged."""
    if fmt == "NCHW":
        return t.mean(dim=(2, 3)) if t.shape[2] * t.shape[3] > 1 else t.flatten(1)
    if fmt == "NHWC":
        return t.mean(dim=(1, 2)) if t.shape[1] * t.shape[2] > 1 else t.flatten(1)
    if fmt == "NLC":
        return t.mean(dim=1)
    return t


def _slice_batch(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() > 0 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_batch(v) for v in value)
    return value


def _check_main_path(model: nn.Module, point: ExitPoint, x: torch.Tensor) -> None:
    """A forward hook at ``point`` that keeps one sample must make the model return one sample."""
    module = model.get_submodule(point.module)
    handle = module.register_forward_hook(lambda m, a, out: _slice_batch(out))
    try:
        out = model(x)
    except Exception:  # noqa: BLE001 - the model's own code may not take a batch change; training is unaffected
        return
    finally:
        handle.remove()
    if isinstance(out, torch.Tensor) and out.shape[0] == x.shape[0]:
        raise ValueError(
            f"{_model_name(model)}: module {point.module!r} (from timm's feature_info) is not on the main "
            "forward path (its output does not feed the classifier). Pick other exit_indices."
        )


def discover(model: nn.Module, config: SelfDistillConfig, input_size: Sequence[int]) -> Discovery:
    """Probe ``model`` once and choose its exit points as ``config`` asks."""
    name = _model_name(model)
    if len(input_size) != 3 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be (C, H, W) positive ints, got {tuple(input_size)!r}.")
    levels = _levels(model)
    head_name, head = _classifier(model)
    outputs: Dict[str, List[Any]] = {lv.module: [] for lv in levels}
    head_inputs: List[Any] = []
    handles = []
    for i, lv in enumerate(levels):
        try:
            mod = model.get_submodule(lv.module)
        except AttributeError:
            continue
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(mod) > 0:
            # a container the model iterates over never runs itself: its last element ends the stage
            last = list(mod.keys())[-1] if isinstance(mod, nn.ModuleDict) else str(len(mod) - 1)
            lv = levels[i] = _Level(f"{lv.module}.{last}", lv.num_chs, lv.reduction)
            outputs[lv.module] = []
            mod = model.get_submodule(lv.module)
        handles.append(mod.register_forward_hook(lambda m, a, out, key=lv.module: outputs[key].append(out)))
    handles.append(head.register_forward_pre_hook(lambda m, a: head_inputs.append(a)))
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                logits = model(x)
            except Exception as e:  # noqa: BLE001 - reported with the way out
                raise ValueError(
                    f"the probe forward of {name} at input_size={tuple(input_size)} failed ({type(e).__name__}: "
                    f"{e}). Pass input_size=(C, H, W) that the model accepts."
                ) from e
            finally:
                for h in handles:
                    h.remove()
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise TypeError(f"{name} must return (N, num_classes) logits in eval mode, got {type(logits)}.")
            if len(head_inputs) != 1 or not isinstance(head_inputs[0][0], torch.Tensor):
                raise ValueError(f"{name}'s classifier {head_name!r} did not run exactly once on one tensor.")
            t_in = head_inputs[0][0]
            t_fmt = "NC" if t_in.dim() == 2 else "NLC" if t_in.dim() == 3 else "NCHW"
            if isinstance(head, nn.Linear) and t_in.dim() == 4:
                t_fmt = "NHWC"
            teacher = ExitPoint(head_name, t_fmt, int(pool_teacher(t_in, t_fmt).shape[1]), hook="forward_pre")

            prefer_nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
            found: List[Tuple[_Level, str, int, Optional[int], Optional[int]]] = []
            for lv in levels:
                outs = outputs[lv.module]
                if len(outs) != 1:
                    continue  # never ran, or ran more than once: no single main-path feature
                out, index = outs[0], None
                if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
                    out, index = out[0], 0
                if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0]:
                    continue
                lay = _layout(out, lv.num_chs, prefer_nhwc)
                if lay is not None and lay[0] != "NC":
                    found.append((lv, lay[0], lay[1], _spatial(out, lay[0]), index))
            if len(found) < 2:
                raise ValueError(
                    f"{name}: timm's feature_info gives fewer than two usable stage outputs on the forward path, "
                    "so its intermediate features cannot be reached. Use another timm model (one that supports "
                    "features_only=True), or pass exit_indices if the default placement is the problem."
                )
            deep = [f for f in found if f[0].reduction > 2]
            if len(deep) >= 2:
                found = deep
            kind = "block" if len({f[0].reduction for f in found}) == 1 else "stage"
            default = default_block_exits(len(found)) if kind == "block" else default_stage_exits(len(found))
            chosen = config.resolve_exit_indices(len(found), default)
            deep_lv, _, _, deep_hw, _ = found[-1]
            points = []
            for i in chosen:
                lv, fmt, chs, hw, index = found[i]
                if hw is not None and deep_hw is not None:
                    stride = max(1, hw // max(1, deep_hw))
                else:
                    stride = max(1, deep_lv.reduction // max(1, lv.reduction))
                points.append(ExitPoint(lv.module, fmt, chs, stride if fmt in ("NCHW", "NHWC") else 1, index))
            for point in points:
                _check_main_path(model, point, x)
    finally:
        model.train(was_training)
    return Discovery(
        kind=kind,
        positions=tuple(f[0].module for f in found),
        points=tuple(points),
        teacher=teacher,
        feature_dim=teacher.channels,
        num_classes=int(logits.shape[1]),
    )
