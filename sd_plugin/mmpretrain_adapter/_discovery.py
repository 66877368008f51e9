"""Finding where exits go in an MMPretrain backbone (private machinery).

Discovery has two steps:

1. *Candidates*: the ordered main-path modules of the backbone, found from a
   per-family table (by class name, following the class hierarchy) or, for an
   unknown backbone, from the usual container attributes (``res_layers``,
   ``stages``, ``layers``, ...). A candidate's output is what the next
   candidate (or the head) consumes, so a forward hook there may shrink the
   batch for the rest of the network.
2. *Probe*: one forward pass in eval mode with hooks on every candidate gives
   each one's layout, channels and resolution. Fine-grained sequences
   (MobileNet, EfficientNet, PoolFormer, timm ``feature_info``) are grouped by
   resolution into stages; stem-level groups (at most 2x downsampling) are
   dropped. Token backbones (ViT, DeiT) expose blocks instead of stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from sd_plugin.core import ExitPoint, SelfDistillConfig, default_block_exits, default_stage_exits, get_submodule

__all__ = ["Candidates", "find_candidates", "discover_exit_points", "probe_input_shape"]

STAGES, SEQUENCE, BLOCKS = "stages", "sequence", "blocks"

#: Probe input size when neither ``probe_size`` nor the backbone's ``img_size`` says otherwise.
DEFAULT_PROBE_SIZE = 64


@dataclass(frozen=True)
class Candidates:
    """Ordered main-path modules of a backbone.

    Attributes:
        names: Dotted module names relative to the backbone, input side first.
        kind: ``'stages'`` (each name ends a stage), ``'sequence'`` (finer units,
            grouped into stages by resolution after the probe) or ``'blocks'``
            (transformer blocks of a plain token backbone).
        channels: Expected channel count per name where the backbone declares it
            (timm ``feature_info``); tells NCHW from NHWC maps.
        user_given: Named by the user (``stage_modules``): taken as stages as they are.
    """

    names: Tuple[str, ...]
    kind: str
    channels: Optional[Tuple[int, ...]] = None
    user_given: bool = False


def _names_of(backbone: nn.Module, attr: str) -> Optional[Tuple[str, ...]]:
    value = getattr(backbone, attr, None)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, (nn.ModuleList, nn.Sequential)) and len(value) > 0:
        return tuple(f"{attr}.{i}" for i in range(len(value)))
    return None


def _vgg(backbone: nn.Module) -> Candidates:
    module_name = getattr(backbone, "module_name", "features")
    ranges: Any = backbone.range_sub_modules
    return Candidates(tuple(f"{module_name}.{end - 1}" for _, end in ranges), STAGES)


def _densenet(backbone: nn.Module) -> Candidates:
    # Each transition (norm, conv, pool) follows its dense stage and feeds the next one.
    transitions: Any = backbone.transitions
    return Candidates(tuple(f"transitions.{i}" for i in range(len(transitions))), STAGES)


def _timm(backbone: nn.Module) -> Candidates:
    model: Any = backbone.timm_model
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError("TIMMBackbone: the timm model has no feature_info to find its stages from.")
    if hasattr(info, "get_dicts"):
        # features_only=True: a FeatureInfo (every stage, whatever out_indices picks) over a
        # FeatureListNet whose module names are flattened ('stages.0' -> 'stages_0').
        dicts = list(getattr(info, "info", None) or info.get_dicts())
        names = [d["module"].replace(".", "_") for d in dicts]
    else:
        dicts = list(info)
        names = [d["module"] for d in dicts]
    present = [(n, d) for n, d in zip(names, dicts) if _has_submodule(model, n)]
    return Candidates(
        tuple(f"timm_model.{n}" for n, _ in present),
        SEQUENCE,
        tuple(int(d["num_chs"]) for _, d in present),
    )


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _attr(attr: str, kind: str) -> Callable[[nn.Module], Optional[Candidates]]:
    def find(backbone: nn.Module) -> Optional[Candidates]:
        names = _names_of(backbone, attr)
        return None if names is None else Candidates(names, kind)

    return find


# Per-family table, keyed by class name and matched along the class hierarchy
# (so DeiT uses VisionTransformer's entry, RegNet and ResNet_CIFAR ResNet's).
_FAMILIES: Dict[str, Callable[[nn.Module], Optional[Candidates]]] = {
    "ResNet": _attr("res_layers", STAGES),
    "VisionTransformer": _attr("layers", BLOCKS),
    "SwinTransformer": _attr("stages", STAGES),
    "SwinTransformerV2": _attr("stages", STAGES),
    "ConvNeXt": _attr("stages", STAGES),
    "DenseNet": _densenet,
    "VGG": _vgg,
    "PoolFormer": _attr("network", SEQUENCE),
    "MobileNetV2": _attr("layers", SEQUENCE),
    "MobileNetV3": _attr("layers", SEQUENCE),
    "EfficientNet": _attr("layers", SEQUENCE),
    "ShuffleNetV2": _attr("layers", SEQUENCE),
    "TIMMBackbone": _timm,
}

# Generic fallback for backbones not in the table: common container attributes.
_FALLBACK: Tuple[Tuple[str, str], ...] = (
    ("res_layers", STAGES),
    ("stages", STAGES),
    ("layers", SEQUENCE),
    ("blocks", SEQUENCE),
    ("network", SEQUENCE),
    ("features", SEQUENCE),
)


def find_candidates(backbone: nn.Module, stage_modules: Optional[Sequence[str]] = None) -> Candidates:
    """The ordered main-path modules of ``backbone`` (see :class:`Candidates`).

    Args:
        backbone: The built backbone.
        stage_modules: User-given stage modules (dotted names relative to the
            backbone, the last one feeding the head); skips the lookup.
    """
    if stage_modules is not None:
        if isinstance(stage_modules, str) or not all(isinstance(n, str) for n in stage_modules):
            raise TypeError(f"stage_modules must be a list of module names, got {stage_modules!r}.")
        if len(stage_modules) < 2:
            raise ValueError(
                f"stage_modules needs at least two stages (exits go before the last), got {stage_modules}."
            )
        for name in stage_modules:
            get_submodule(backbone, name)
        return Candidates(tuple(stage_modules), STAGES, user_given=True)
    for cls in type(backbone).__mro__:
        finder = _FAMILIES.get(cls.__name__)
        if finder is not None:
            found = finder(backbone)
            if found is not None:
                return found
    for attr, kind in _FALLBACK:
        names = _names_of(backbone, attr)
        if names is not None and len(names) >= 2:
            return Candidates(names, kind)
    raise ValueError(
        f"cannot find the stages of backbone {type(backbone).__name__}: it has none of the known stage "
        f"containers ({', '.join(a for a, _ in _FALLBACK)}). Name its main-path stage modules with "
        "SelfDistillClassifier(stage_modules=['layer1', 'layer2', ...]) (each one's output feeding the next, "
        f"the last one feeding the neck/head), or use a supported backbone ({', '.join(sorted(_FAMILIES))})."
    )


@dataclass(frozen=True)
class _Probe:
    name: str
    shape: Tuple[int, ...]
    output_index: Optional[int]


def _first_tensor(value: Any, batch: int) -> Tuple[Optional[torch.Tensor], Optional[int]]:
    """The output tensor with one row per sample (a tuple may also hold e.g. TNT's per-patch tokens)."""
    if isinstance(value, torch.Tensor):
        return (value, None) if value.dim() > 0 and value.shape[0] == batch else (None, None)
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
                return v, i
    return None, None


def _probe(backbone: nn.Module, names: Sequence[str], run: Callable[[], Any], batch: int) -> List[_Probe]:
    seen: Dict[str, _Probe] = {}
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor, index = _first_tensor(output, batch)
            if tensor is not None:
                seen[name] = _Probe(name, tuple(tensor.shape), index)

        return hook

    for name in names:
        handles.append(get_submodule(backbone, name).register_forward_hook(make_hook(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [seen[n] for n in names if n in seen]


def _layout(probe: _Probe, expected_channels: Optional[int]) -> Tuple[str, int]:
    shape = probe.shape
    if len(shape) == 4:
        if expected_channels is not None and shape[1] != expected_channels and shape[3] == expected_channels:
            return "NHWC", shape[3]
        return "NCHW", shape[1]
    if len(shape) == 3:
        return "NLC", shape[2]
    if len(shape) == 2:
        return "NC", shape[1]
    raise ValueError(
        f"module {probe.name!r} gives a {len(shape)}-D output {shape}; exits read 2-D, 3-D or 4-D features."
    )


def _spatial(probe: _Probe, fmt: str) -> Optional[Tuple[int, ...]]:
    if fmt == "NCHW":
        return probe.shape[2:]
    if fmt == "NHWC":
        return probe.shape[1:3]
    if fmt == "NLC":
        return probe.shape[1:2]
    return None


def discover_exit_points(
    backbone: nn.Module,
    candidates: Candidates,
    config: SelfDistillConfig,
    run: Callable[[], Any],
    input_size: Tuple[int, int],
    batch: int = 2,
) -> Tuple[List[ExitPoint], int]:
    """Probe ``backbone`` (``run`` performs one forward pass of ``batch`` samples) and place the exits.

    Returns:
        The exit points (shallowest first) and the number of positions (stages
        or blocks) the exit indices refer to.
    """
    probes = _probe(backbone, candidates.names, run, batch)
    if len(probes) < 2:
        raise ValueError(
            f"backbone {type(backbone).__name__}: only {len(probes)} of its stage modules "
            f"{list(candidates.names)} ran in a forward pass, so there is nowhere to put an exit. Name the "
            "main-path stages with SelfDistillClassifier(stage_modules=[...])."
        )
    chans = dict(zip(candidates.names, candidates.channels or ()))
    layouts = [_layout(p, chans.get(p.name)) for p in probes]
    spatial = [_spatial(p, fmt) for p, (fmt, _) in zip(probes, layouts)]
    kind = candidates.kind
    keep = list(range(len(probes)))
    if kind != BLOCKS and not candidates.user_given and len(set(spatial)) == 1 and len(probes) > 4:
        # Isotropic networks (ConvMixer, MLP-Mixer, a timm ViT's feature_info): every unit works at
        # one resolution, so they are blocks, not stages.
        kind = BLOCKS
    if kind == SEQUENCE:
        if len(set(spatial)) == 1:
            kind = STAGES
        else:
            ends = [i for i in range(len(probes)) if i == len(probes) - 1 or spatial[i] != spatial[i + 1]]
            deep = [i for i in ends if _reduction(spatial[i], layouts[i][0], input_size) > 2]
            keep = deep if len(deep) >= 2 else ends
    n = len(keep)
    default = default_block_exits(n) if kind == BLOCKS else default_stage_exits(n)
    chosen = config.resolve_exit_indices(n, default)
    if not chosen:
        raise ValueError(f"backbone {type(backbone).__name__} has too few positions ({n}) for an exit.")
    last = keep[-1]
    points = []
    for j in chosen:
        i = keep[j]
        fmt, channels = layouts[i]
        points.append(
            ExitPoint(
                module=probes[i].name,
                fmt=fmt,
                channels=channels,
                stride=_stride(spatial[i], spatial[last], fmt, layouts[last][0]),
                output_index=probes[i].output_index,
            )
        )
    return points, n


def _reduction(spatial: Optional[Tuple[int, ...]], fmt: str, input_size: Tuple[int, int]) -> float:
    if spatial is None or fmt not in ("NCHW", "NHWC"):
        return float("inf")
    return input_size[0] / max(1, spatial[0])


def _stride(here: Optional[Tuple[int, ...]], deepest: Optional[Tuple[int, ...]], fmt: str, deepest_fmt: str) -> int:
    spatial_fmts = ("NCHW", "NHWC")
    if fmt not in spatial_fmts or deepest_fmt not in spatial_fmts or here is None or deepest is None:
        return 1
    return max(1, round(here[0] / max(1, deepest[0])))


def probe_input_shape(backbone: nn.Module, probe_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    """(channels, height, width) of the probe input.

    Channels come from the backbone's first convolution (3 when it has none);
    the size from ``probe_size``, else the backbone's declared ``img_size``,
    else :data:`DEFAULT_PROBE_SIZE` (small, so the probe is cheap; strides are
    ratios of map sizes and do not depend on it).
    """
    in_chans = 3
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            in_chans = m.in_channels
            break
    size: Any = probe_size
    if size is None:
        size = getattr(backbone, "img_size", None)
    if size is None:
        size = getattr(getattr(backbone, "patch_embed", None), "init_input_size", None)
    if size is None:
        size = DEFAULT_PROBE_SIZE
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, str) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"probe_size must be an int or (height, width), got {probe_size!r}.")
    h, w = (int(s) for s in size)
    if min(h, w) < 1:
        raise ValueError(f"probe_size must be positive, got {probe_size!r}.")
    return in_chans, h, w
