"""Plain models to compare early exit with: ``sd-plugin report --baseline``.

A user's alternative to early exit is a smaller plain model. Each baseline (a plain checkpoint of the same route
that takes the same inputs: a timm checkpoint naming its architecture, or an MMPretrain checkpoint with its config)
is scored on the report's test images and, with ``--timing``, timed in the same interleaved rounds as the exits and
the early-exit operating points. :func:`frontier` then says which of them no other point beats in both top-1 and
latency.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..deploy.speed import BATCHES
from ._load import Loaded, _load_strict, _saved_args, build_mm_model, create_timm, read_checkpoint, state_dict_of

__all__ = [
    "Baseline",
    "add_baseline_args",
    "load_baselines",
    "baseline_logits",
    "baseline_rows",
    "point_keys",
    "baseline_key",
    "extra_nets",
    "plane_points",
    "frontier",
]

#: Kinds of point on the accuracy-latency plane, in the order the report lists them.
KINDS = ("plain model", "exit", "ensemble", "early exit")


@dataclass
class Baseline:
    """A plain model: its name, checkpoint, module (for parameters and FLOPs) and its logits function."""

    name: str
    checkpoint: str
    module: nn.Module
    net: Callable[[torch.Tensor], torch.Tensor]


def add_baseline_args(group: Any) -> None:
    group.add_argument(
        "--baseline",
        nargs="+",
        default=[],
        metavar="[NAME=]CKPT",
        help="plain models to compare with, each optionally named (timm: a checkpoint naming its architecture, "
        "e.g. the one 'sd-plugin train-timm --no-sd' writes; MMPretrain: with --baseline-config)",
    )
    group.add_argument(
        "--baseline-config", nargs="+", default=[], metavar="CFG", help="MMPretrain: each --baseline's config"
    )


def load_baselines(args: argparse.Namespace, loaded: Loaded, example: torch.Tensor) -> List[Baseline]:
    """The ``--baseline`` models, in eval mode on the report model's device, weights loaded strictly; ``example``:
    one of the report's inputs, which each baseline must take."""
    paths: List[str] = list(args.baseline)
    configs: List[str] = list(args.baseline_config)
    if loaded.source == "mmpretrain":
        if len(configs) != len(paths):
            raise ValueError(
                f"give one --baseline-config per --baseline ({len(paths)} checkpoint(s), {len(configs)} config(s)): "
                "an MMPretrain checkpoint is rebuilt from its config."
            )
        out = [_mmpretrain_baseline(path, c, loaded, example) for (_, path), c in zip(map(split_name, paths), configs)]
    else:
        if configs:
            raise ValueError("--baseline-config is for MMPretrain baselines; a timm baseline names its architecture.")
        out = [_timm_baseline(path, loaded, args, example) for _, path in map(split_name, paths)]
    for b, (name, _) in zip(out, map(split_name, paths)):
        b.name = name or b.name
    if len({b.name for b in out}) < len(out):
        raise ValueError(f"two --baseline models share a name ({[b.name for b in out]}): name them, NAME=CKPT.")
    return out


def split_name(given: str) -> Tuple[Optional[str], str]:
    """``'NAME=CKPT'`` -> (NAME, CKPT); a bare path (or an existing file with '=' in its name) -> (None, path)."""
    name, sep, path = given.partition("=")
    if not sep or Path(given).exists() or "/" in name or not name:
        return None, given
    return name, path


def _timm_baseline(path: str, loaded: Loaded, args: argparse.Namespace, example: torch.Tensor) -> Baseline:
    ckpt = read_checkpoint(path, "--baseline")
    saved = _saved_args(ckpt)
    arch = ckpt.get("arch") or saved.get("model")
    if not isinstance(arch, str) or not arch:
        raise ValueError(
            f"--baseline {path!r} does not name a timm architecture (no 'arch' entry): give the checkpoint-last.pth "
            "of 'sd-plugin train-timm --no-sd', or save {'arch': NAME, 'state_dict': ...}."
        )
    state = state_dict_of(ckpt)
    head = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    num_classes = saved.get("num_classes") or (int(head[-1].shape[0]) if head else None)
    if not num_classes:
        raise ValueError(f"the number of classes of --baseline {path!r} is not known: save 'args': {{'num_classes'}}.")
    size = loaded.input_size[-1] if loaded.input_size else None
    model = create_timm(arch, int(num_classes), saved.get("img_size") or size)
    _load_strict(model, state, path, "that --baseline is a plain timm model of its 'arch'")
    model = model.to(loaded.device).eval()
    _check_timm_inputs(model, loaded, path, example, same_norm=not (args.mean or args.std))
    return Baseline(f"{arch} ({Path(path).parent.name})", path, model, model)


def _check_timm_inputs(model: nn.Module, loaded: Loaded, path: str, example: torch.Tensor, same_norm: bool) -> None:
    """A timm baseline takes the report model's images: the same normalisation (unless --mean/--std set it for
    both) and the same input size."""
    from timm.data import resolve_data_config

    if same_norm:
        mine, theirs = resolve_data_config({}, model=loaded.model), resolve_data_config({}, model=model)
        for key in ("mean", "std"):
            if tuple(mine[key]) != tuple(theirs[key]):
                raise ValueError(
                    f"--baseline {path!r} normalises images with {key} {tuple(theirs[key])}, the report model with "
                    f"{tuple(mine[key])}: a baseline must take the same inputs (or give --mean and --std for both)."
                )
    try:
        with torch.inference_mode():
            model(example)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"--baseline {path!r} does not take the report model's inputs {tuple(example.shape[1:])}: {err}"
        ) from err


def _mmpretrain_baseline(path: str, config: str, loaded: Loaded, example: torch.Tensor) -> Baseline:
    from ..deploy import truncate
    from ..mmpretrain_adapter.classifier import SelfDistillClassifier

    model, _ = build_mm_model(config)
    _load_strict(model, state_dict_of(read_checkpoint(path, "--baseline")), path, "that --baseline-config is its")
    model = model.to(loaded.device).eval()
    _check_same_inputs(model, loaded, config)
    if isinstance(model, SelfDistillClassifier):  # a model with exits compared by its deepest classifier
        deepest = truncate(model, exit="deepest", example_input=example)  # exit heads dropped
        return Baseline(Path(config).stem, path, deepest, deepest)

    def net(x: torch.Tensor) -> torch.Tensor:
        return model(x, mode="tensor")  # type: ignore[no-any-return]

    return Baseline(Path(config).stem, path, model, net)


def _check_same_inputs(model: nn.Module, loaded: Loaded, config: str) -> None:
    """A baseline is fed the report model's preprocessed images: its data preprocessor must normalise alike."""
    mine, theirs = loaded.model.data_preprocessor, model.data_preprocessor
    for key in ("mean", "std"):
        a, b = getattr(mine, key, None), getattr(theirs, key, None)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a.cpu(), b.cpu())):  # type: ignore[union-attr]
            raise _differs(config, key)
    if _to_rgb(mine) != _to_rgb(theirs):
        raise _differs(config, "to_rgb")


def _to_rgb(preprocessor: Any) -> bool:
    """Whether an MMPretrain data preprocessor swaps BGR to RGB (``ClsDataPreprocessor.to_rgb``, mmengine's
    ``_channel_conversion``)."""
    return bool(getattr(preprocessor, "to_rgb", getattr(preprocessor, "_channel_conversion", False)))


def _differs(config: str, key: str) -> ValueError:
    return ValueError(
        f"--baseline-config {config!r} preprocesses images differently from --config (data_preprocessor {key}): "
        "a baseline must take the same inputs to be compared on the same images."
    )


@torch.inference_mode()
def baseline_logits(baselines: Sequence[Baseline], batches: Any) -> List[torch.Tensor]:
    """(N, C) logits of every baseline on ``batches`` (pairs of inputs and labels), in one pass over the data."""
    outs: List[List[torch.Tensor]] = [[] for _ in baselines]
    for x, _ in batches:
        for out, b in zip(outs, baselines):
            out.append(b.net(x).float().cpu())
    return [torch.cat(o) for o in outs]


def baseline_rows(
    baselines: Sequence[Baseline],
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    example: torch.Tensor,
    topk: Callable[[torch.Tensor, torch.Tensor, int], float],
    top_k: Sequence[int],
) -> List[Dict[str, Any]]:
    """Top-k, parameters and FLOPs (mmengine's counter, when installed) of every baseline."""
    rows = []
    for b, out in zip(baselines, logits):
        row: Dict[str, Any] = {"name": b.name, "checkpoint": b.checkpoint}
        row.update({f"top{n}": topk(out, targets, n) for n in top_k})
        row["params"] = sum(p.numel() for p in b.module.parameters())
        row["flops"] = _flops(b, example)
        rows.append(row)
    return rows


def _flops(b: Baseline, example: torch.Tensor) -> Optional[int]:
    from ..deploy.flops import count_call_flops

    try:
        total, _ = count_call_flops(b.module, b.net, example)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("mmengine"):
            raise
        return None
    return int(total)


def point_keys(points: Sequence[Tuple[Dict[str, Any], Any]]) -> List[str]:
    """The names under which the report times its early-exit operating points."""
    return [f"early exit ({p.get('method')}, max drop {p['max_drop']})" for p, _ in points]


def baseline_key(name: str) -> str:
    """The name under which the report times a plain model."""
    return f"plain {name}"


def extra_nets(
    model: nn.Module, points: Sequence[Tuple[Dict[str, Any], Any]], baselines: Sequence[Any]
) -> Dict[str, Callable[[torch.Tensor], Any]]:
    """What is timed beside the exits: early exit at every operating point, and every plain model."""
    from ..deploy import EarlyExitModel

    nets: Dict[str, Callable[[torch.Tensor], Any]] = {
        key: EarlyExitModel(model, policy).eval() for (_, policy), key in zip(points, point_keys(points)) if policy
    }
    nets.update({baseline_key(b.name): b.net for b in baselines})
    return nets


def plane_points(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every timed point of the report on the accuracy-latency plane: label, kind, top-1 and latencies."""
    keys = ["top1", *(f"latency_{b}_ms" for b in BATCHES)]
    out = [
        {"label": r["exit"], "kind": "exit" if r["number"] else "ensemble", **{k: r[k] for k in keys}}
        for r in report["exits"]
    ]
    for p in report["operating_points"]:
        if "error" not in p:
            label = f"early exit ({p['method']}, max drop {p['max_drop']})"
            out.append({"label": label, "kind": "early exit", "top1": p["test"]["top1"], **{k: p[k] for k in keys[1:]}})
    out += [
        {"label": baseline_key(r["name"]), "kind": "plain model", **{k: r[k] for k in keys}}
        for r in report.get("baselines", [])
    ]
    return out


def frontier(points: Sequence[Mapping[str, Any]], latency: str) -> List[Mapping[str, Any]]:
    """The points no other point beats: none is at least as accurate and as fast, and better in one of the two.

    Args:
        points: Dicts with ``'top1'`` and the ``latency`` key (and whatever names them).
        latency: Which latency to compare (e.g. ``'latency_b1_ms'``).

    Returns:
        The undominated points, fastest first.
    """

    def beats(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        no_worse = a["top1"] >= b["top1"] and a[latency] <= b[latency]
        return bool(no_worse and (a["top1"] > b["top1"] or a[latency] < b[latency]))

    kept = [p for p in points if not any(beats(q, p) for q in points if q is not p)]
    return sorted(kept, key=lambda p: p[latency])
