"""How much of MMPretrain the two lines handle: every packaged supervised classification config, checked.

Each is built with sd_plugin and as the plain ``ImageClassifier`` with the same weights, in a forked child with a time
limit; configs with the same model dict and input size share one check (``shared_with``). See docs/coverage.md.

    python -m tools.coverage_mmpretrain --filter 'resnet/*' --output work_dirs/coverage_mmp_resnet.json
"""

from __future__ import annotations

import copy
import glob
import inspect
import json
import os
import random
import re
import sys
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import tools._coverage as cov
from tools._coverage import BROKEN, require, text

Size = Tuple[int, int]

CONFIG_ROOT = os.path.join(os.path.dirname(str(__import__("mmpretrain").__file__)), ".mim", "configs")
#: Where a model class that is not an ImageClassifier lives, and what that makes it.
KINDS = {".selfsup.": "self-supervised pre-training algorithm", ".retrievers.": "image retriever"}
KINDS[".multimodal."] = "multimodal model"


def _why_not(cfg: Any) -> Optional[str]:
    """Why a loaded config does not count, or None."""
    import mmpretrain.models  # noqa: F401 - registers the model classes
    from mmpretrain.models.classifiers import ImageClassifier
    from mmpretrain.registry import MODELS

    model_type = (cfg.get("model") or {}).get("type")
    cls = MODELS.get(model_type) if isinstance(model_type, str) else model_type
    if model_type is None:
        return "no model in the file (a helper file, not a config)"
    if not isinstance(cls, type):
        return f"multimodal model ({model_type}: needs the optional multimodal dependencies)"
    if issubclass(cls, ImageClassifier):
        headless = "ImageClassifier without a head (a feature-extraction config: it cannot classify)"
        return None if cfg.model.get("head") else headless
    return next((v for k, v in KINDS.items() if k in cls.__module__), "not an ImageClassifier") + f" ({model_type})"


def _base_model_type(path: str) -> Optional[str]:
    """``model.type`` read from the model base file(s) of a config mmengine cannot load (text only)."""
    with open(path) as f:
        source = f.read()
    model = source.split("model = dict(", 1)[1] if "model = dict(" in source else ""
    found = re.findall(r"type=['\"](\w+)['\"]", model)
    bases = [os.path.join(os.path.dirname(path), b) for b in re.findall(r"['\"]([^'\"]+\.py)['\"]", source)]
    in_bases = (_base_model_type(b) for b in bases if os.path.isfile(b))
    return found[0] if found else next(filter(None, in_bases), None)


def enumerate_configs(pattern: str = "*") -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(counted, excluded): 'family/file.py' to its loaded Config (or why mmengine cannot load it), or to why it does
    not count."""
    from fnmatch import fnmatch

    from mmengine import Config

    counted: Dict[str, Any] = {}
    excluded: Dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(CONFIG_ROOT, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, CONFIG_ROOT)
        if rel.startswith("_base_") or not fnmatch(rel, pattern):
            continue
        try:
            cfg = Config.fromfile(path)
        except Exception as e:  # noqa: BLE001 - classified below
            if "mmdet" in str(e):
                excluded[rel] = "detection benchmark (needs mmdet; not a classifier)"
            else:
                counts = _base_model_type(path) == "ImageClassifier"
                (counted if counts else excluded)[rel] = f"mmengine cannot load the config: {text(e)}"[:300]
            continue
        why = _why_not(cfg)
        (excluded if why else counted)[rel] = why or cfg
    return counted, excluded


def family(rel: str) -> str:
    return rel.split("/", 1)[0]


def _pair(value: Any) -> Optional[Size]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def input_size(cfg: Any) -> Size:
    """A config's input size: the backbone's ``img_size`` where set (TinyViT-21M-384px's inherited pipeline crops 224),
    else the last crop (or a resize before any crop) of the train pipeline, else the test pipeline's, else 224."""
    size = _pair((cfg.model.get("backbone") or {}).get("img_size"))
    for loader in ("train_dataloader", "test_dataloader", "val_dataloader"):
        if size:
            return size
        dataset = (cfg.get(loader) or {}).get("dataset") or {}
        while "pipeline" not in dataset and isinstance(dataset.get("dataset"), dict):
            dataset = dataset["dataset"]
        for t in dataset.get("pipeline") or []:
            kind = str(t.get("type", ""))
            if "Crop" in kind:
                value = _pair(t.get("crop_size", t.get("scale", t.get("size"))))
            else:  # only the short edge of a ResizeEdge: the crop after it sets the size
                value = _pair(t.get("scale")) if kind == "Resize" and size is None else None
            size = (value[1], value[0]) if value else size  # mmcv scales are (w, h)
    return size or (224, 224)


def _strip_pretrained(node: Any) -> Any:
    """Drop every ``init_cfg`` that loads a checkpoint and every ``pretrained`` file/URL: nothing downloads."""
    if isinstance(node, list):
        return [_strip_pretrained(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "init_cfg":
            items = v if isinstance(v, list) else [v]
            loads = [i for i in items if isinstance(i, dict) and (i.get("type") == "Pretrained" or "checkpoint" in i)]
            kept = [i for i in items if i not in loads]
            if not kept:
                continue
            v = kept if isinstance(v, list) else kept[0]
        elif k == "pretrained" and v:
            v = False if isinstance(v, bool) else None
        out[k] = _strip_pretrained(v)
    return out


def model_cfg(cfg: Any) -> Dict[str, Any]:
    """The model dict as the Runner builds it (top-level data_preprocessor merged in), no checkpoint loading."""
    model = copy.deepcopy(cfg.model.to_dict())
    dp = cfg.get("data_preprocessor")
    if dp is not None and "data_preprocessor" not in model:
        model["data_preprocessor"] = copy.deepcopy(dp.to_dict() if hasattr(dp, "to_dict") else dict(dp))
    return _strip_pretrained(model)


def test_key(model: Dict[str, Any], size: Size, small: int) -> str:
    """Configs with the same key are checked once: the same model dict and input size; with ``--size`` (``small``
    below the config's own size), model dicts that differ only in the backbone's ``img_size``, which it replaces."""
    if small and small < min(size):
        model = dict(model, backbone={k: v for k, v in model["backbone"].items() if k != "img_size"})
        return json.dumps([model, "small", small], sort_keys=True, default=str)
    return json.dumps([model, list(size)], sort_keys=True, default=str)


def _build(cfg: Dict[str, Any], device: str = "cpu") -> nn.Module:
    from mmpretrain.registry import MODELS

    with torch.device(device):
        return MODELS.build(copy.deepcopy(cfg))


def _copy_weights(plain: nn.Module, sd: nn.Module) -> nn.Module:
    """Copy every parameter and buffer of ``plain`` from ``sd`` by name. Not ``load_state_dict``: some backbones
    drop their own buffers from a state dict while loading it (SwinV2's coordinate tables)."""
    src = {**dict(sd.named_parameters()), **dict(sd.named_buffers())}
    with torch.no_grad():
        for name, t in [*plain.named_parameters(), *plain.named_buffers()]:
            if name not in src or src[name].shape != t.shape:
                raise KeyError(f"{name} is not in the SelfDistillClassifier with the same shape")
            t.copy_(src[name])
    return plain


def _seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batch(model: Any, size: Size, training: bool, seed: int) -> Tuple[torch.Tensor, List[Any]]:
    """Two random images through the model's data preprocessor (batch augments when ``training``)."""
    from mmpretrain.structures import DataSample

    mean = getattr(model.data_preprocessor, "mean", None)
    channels = int(mean.shape[0]) if isinstance(mean, torch.Tensor) and mean.dim() == 3 else 3  # LeNet: 1
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, (channels, *size), generator=g, dtype=torch.uint8) for _ in range(2)]
    samples = [DataSample().set_gt_label(i % int(getattr(model.head, "num_classes", 2) or 2)) for i in range(2)]
    _seed(seed)
    data = model.data_preprocessor({"inputs": imgs, "data_samples": samples}, training)
    return data["inputs"], data["data_samples"]


def _losses(model: nn.Module, inputs: Any, samples: List[Any], grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(total, deepest): the training loss summed as mmengine adds it up, and the same without the ``exit*`` terms."""
    model.train()
    _seed(1)
    total, deepest = torch.zeros(()), torch.zeros(())
    with torch.set_grad_enabled(grad):
        for k, v in model(inputs, copy.deepcopy(samples), mode="loss").items():
            for t in (v if isinstance(v, (list, tuple)) else [v]) if "loss" in k else []:
                total = total + t.mean()
                deepest = deepest if k.startswith("exit") else deepest + t.mean()
    return total, deepest


def check_config(model: Dict[str, Any], own: Size, small: int, max_params: float) -> Dict[str, Any]:
    """The check (docs/coverage.md), at the config's own input size (``small`` = 0) or at the first of
    ``small``, ``2 * small``, own that the plain model takes (backbones that take ``img_size`` get it)."""
    import logging
    import warnings

    from mmengine.logging import MMLogger
    from mmpretrain.registry import MODELS

    import sd_plugin  # noqa: F401 - the first of the two lines: registers SelfDistillClassifier

    warnings.filterwarnings("ignore")  # mmengine's init logs and library warnings would bury the tool's output
    MMLogger.get_current_instance().setLevel(logging.ERROR)
    too_big = dict(status=cov.SLOW, error="over --max-params (two copies of the model and its gradients)")
    try:
        n = sum(p.numel() for p in _build(dict(model, type="ImageClassifier"), "meta").parameters())
    except Exception:  # noqa: BLE001 - some backbones cannot be built on meta: counted on CPU below
        n = 0
    if n > max_params:
        return dict(too_big, params_m=round(n / 1e6, 2))
    errors: List[str] = []
    sizes = [(s, s) for s in (small, 2 * small) if small and s < min(own)] + [own]
    for size in sizes:
        at = f"at {size[0]}x{size[1]}: "
        plain_cfg = dict(model, type="ImageClassifier")
        cls = MODELS.get(model["backbone"].get("type")) if size != own else None
        if isinstance(cls, type) and "img_size" in inspect.signature(cls.__init__).parameters:  # type: ignore[misc]
            plain_cfg["backbone"] = dict(model["backbone"], img_size=size[0] if size[0] == size[1] else size)
        try:
            _seed(0)
            sd = _build(dict(plain_cfg, type="SelfDistillClassifier"))  # the second line
        except Exception as e:  # noqa: BLE001 - sd_plugin's fault unless the plain model fails too
            try:
                plain = _build(plain_cfg)
                _losses(plain, *_batch(plain, size, True, 0))
            except Exception as plain_error:  # noqa: BLE001
                errors.append((at + text(plain_error))[:300])
                continue
            return dict(status=cov.FAIL, size=list(size), error=text(e)[:400])
        if sum(p.numel() for p in sd.parameters()) > max_params:
            return too_big
        inputs, samples = _batch(sd, size, True, 0)
        try:  # the plain model with exactly the weights of sd
            plain = _copy_weights(_build(plain_cfg), sd)
            plain_loss = _losses(plain, inputs, samples)[0]
        except Exception as e:  # noqa: BLE001 - the next size, or the report
            errors.append((at + text(e))[:300])
            continue
        params_m = round(sum(p.numel() for p in plain.parameters()) / 1e6, 2)
        result: Dict[str, Any] = dict(params_m=params_m, size=list(size), own_size=list(own))
        if errors:
            result["smaller_sizes_failed"] = errors
        try:
            _compare(sd, plain, inputs, samples, plain_loss, size, result)
            return dict(result, status=cov.OK)
        except Exception as e:  # noqa: BLE001
            result.update(cov.verdict(e))
        if result["status"] != BROKEN or size == sizes[-1]:
            return result
        errors.append(at + result["error"])  # e.g. NaN scores of a deep net on small maps: the next size
        del sd, plain
    return dict(status=BROKEN, error=f"plain ImageClassifier {errors[-1]}"[:400], errors=errors)


def _compare(sd: Any, plain: nn.Module, inputs: Any, samples: Any, plain_loss: Any, size: Size, out: Dict) -> None:
    """The comparisons of one check; fills ``out``, raises :class:`~tools._coverage.Failed` unless all pass."""
    plain_names = {k for k, _ in plain.named_parameters()}
    exit_params = [(k, p) for k, p in sd.named_parameters() if k not in plain_names and p.requires_grad]
    exits = [f"{getattr(p, 'module', p)}:{getattr(p, 'fmt', '')}" for p in getattr(sd, "exit_points", None) or []]
    out.update(num_exits=getattr(sd, "num_exits", None), exits=exits)
    require(exit_params, "no exit parameters")
    total, deepest = _losses(sd, inputs, samples, grad=True)
    out.update(plain_loss=plain_loss.item(), deepest_loss=deepest.item(), loss_exact=bool(deepest == plain_loss))
    require(torch.isfinite(total), f"total loss is {total.item()}")
    total.backward()
    dead = [k for k, p in exit_params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    require(not dead, f"{len(dead)} exit parameters without a finite non-zero gradient: {dead[:3]}")
    same = torch.allclose(deepest, plain_loss, rtol=1e-6, atol=0.0)
    require(same, f"deepest loss {deepest.item()!r} != plain loss {plain_loss.item()!r}")
    torch.optim.SGD([p for p in sd.parameters() if p.requires_grad], lr=1e-3).step()
    _copy_weights(plain, sd).eval()
    sd.eval()
    x, s = _batch(plain, size, False, 2)
    with torch.no_grad():
        got, want = (torch.stack([d.pred_score for d in m(x, copy.deepcopy(s), mode="predict")]) for m in (sd, plain))
    require(torch.isfinite(want).all(), f"the plain model predicts non-finite scores at {size[0]}x{size[1]}", BROKEN)
    diff = (got - want).abs().max().item() if got.shape == want.shape else f"shapes {got.shape} {want.shape}"
    require(torch.equal(got, want), f"predict differs from the plain model (max |diff| {diff})")  # shapes too
    problem = cov.placement_problem(sd, x)
    require(not problem, f"misplaced exits: {problem}")


def main(argv: Optional[List[str]] = None) -> int:
    p = cov.parser(__doc__, timeout=600.0, max_params=400e6, name="mmpretrain")
    p.add_argument("--filter", default="*", help="glob on 'family/file.py' under .mim/configs (default: all)")
    p.add_argument("--size", type=int, default=0, help="0: each config at its own size; N: the first of N, 2N, own")
    args = p.parse_args(argv)
    counted, excluded = enumerate_configs(args.filter)
    results = cov.previous(args)
    groups: Dict[str, List[str]] = defaultdict(list)
    tasks: Dict[str, cov.Task] = {}  # one per distinct check
    for rel, cfg in counted.items():
        if rel in results and results[rel]["status"] != args.retry:
            continue
        if isinstance(cfg, str):  # mmengine cannot load it
            results[rel] = dict(status=BROKEN, error=cfg)
            continue
        model, size = model_cfg(cfg), input_size(cfg)
        key = test_key(model, size, args.size)
        groups[key].append(rel)
        tasks[key] = (key, (model, size, args.size, args.max_params), args.timeout)

    n = sum(map(len, groups.values()))
    print(f"{len(counted)} configs ({len(excluded)} files excluded): {n} to check as {len(tasks)} distinct checks")

    def store(key: str, r: Dict[str, Any]) -> str:
        for rel in groups[key]:
            results[rel] = dict(r, shared_with=[o for o in groups[key] if o != rel])
        return f"{groups[key][0]:60s} +{len(groups[key]) - 1}"

    def extra() -> Dict[str, Any]:
        distinct = {tuple(sorted([k, *r["shared_with"]])) if r.get("shared_with") else k for k, r in results.items()}
        reasons = dict(Counter(excluded.values()).most_common())
        files = dict(count=len(excluded), by_reason=reasons, files=excluded)
        return dict(counted=len(counted), excluded=files, distinct_checks=len(distinct))

    cov.sweep(args, results, list(tasks.values()), check_config, store, family, "family (config folder)", extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
