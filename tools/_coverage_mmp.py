"""Machinery of ``tools/coverage_mmpretrain.py``: which packaged configs count, their input size, and the check.

What counts: every config file under mmpretrain's packaged ``.mim/configs`` (``_base_`` excepted) whose ``model.type``
is :class:`~mmpretrain.models.ImageClassifier` or a registered subclass of it. Everything else is listed with the
reason it does not count (self-supervised pre-training algorithms, multimodal models, retrievers, detection
benchmarks, helper files). Configs that mmengine cannot load are read again from their model base file: when
that says ``ImageClassifier`` they count, as failures of mmpretrain itself.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from tools._coverage_run import BROKEN, FAIL, OK, SLOW

CONFIG_ROOT = os.path.join(os.path.dirname(__import__("mmpretrain").__file__), ".mim", "configs")


def _kind(model_type: Any) -> Tuple[bool, str]:
    """(counts, why) for a ``model.type`` value."""
    import mmpretrain.models  # noqa: F401 - registers the model classes
    from mmpretrain.models.classifiers import ImageClassifier
    from mmpretrain.registry import MODELS

    if model_type is None:
        return False, "no model in the file (a helper file, not a config)"
    cls = MODELS.get(model_type) if isinstance(model_type, str) else model_type
    if isinstance(cls, type) and issubclass(cls, ImageClassifier):
        return True, "ImageClassifier"
    module = getattr(cls, "__module__", "") or ""
    if not isinstance(cls, type):
        return False, f"multimodal model ({model_type}: needs the optional multimodal dependencies)"
    if ".selfsup." in module:
        return False, f"self-supervised pre-training algorithm ({model_type})"
    if ".retrievers." in module:
        return False, f"image retriever ({model_type})"
    if ".multimodal." in module:
        return False, f"multimodal model ({model_type})"
    return False, f"not an ImageClassifier ({model_type})"


def _base_model_type(path: str) -> Optional[str]:
    """``model.type`` read from the model base file(s) of a config mmengine cannot load (text only)."""
    with open(path) as f:
        text = f.read()
    found = re.findall(r"type=['\"](\w+)['\"]", text.split("model = dict(", 1)[1]) if "model = dict(" in text else []
    if found:
        return found[0]
    for base in re.findall(r"['\"](\.\./_base_/models/[^'\"]+)['\"]", text):
        t = _base_model_type(os.path.normpath(os.path.join(os.path.dirname(path), base)))
        if t:
            return t
    return None


def enumerate_configs(pattern: str = "*") -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(counted, excluded): counted maps 'family/file.py' to its loaded Config (or an error text when mmengine
    cannot load it); excluded maps the others to the reason."""
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
            error = f"mmengine cannot load the config: {type(e).__name__}: {e}"[:300]
            if "mmdet" in str(e):
                excluded[rel] = "detection benchmark (needs mmdet; not a classifier)"
            elif _base_model_type(path) == "ImageClassifier":
                counted[rel] = error
            else:
                excluded[rel] = error
            continue
        counts, why = _kind((cfg.get("model") or {}).get("type"))
        if counts:
            counted[rel] = cfg
        else:
            excluded[rel] = why
    return counted, excluded


def family(rel: str) -> str:
    return rel.split("/", 1)[0]


def _crop_size(pipeline: Any) -> Optional[Tuple[int, int]]:
    """(h, w) of the last crop/resize in a data pipeline."""
    size = None
    for t in pipeline or []:
        kind = str(t.get("type", ""))
        value = None
        if "Crop" in kind:
            value = t.get("crop_size", t.get("scale", t.get("size")))
        elif kind in ("Resize", "ResizeEdge") and size is None and t.get("scale") is not None:
            value = t.get("scale")
            if kind == "ResizeEdge":
                value = None  # only the short edge: the crop after it sets the size
        if value is None:
            continue
        if isinstance(value, int):
            size = (value, value)
        elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            size = (int(value[1]), int(value[0]))  # mmcv scales are (w, h)
    return size


def input_size(cfg: Any) -> Tuple[int, int]:
    """The training input size of a config: its train pipeline's crop, else test pipeline's, else img_size, 224."""
    for loader in ("train_dataloader", "test_dataloader", "val_dataloader"):
        dataset = (cfg.get(loader) or {}).get("dataset") or {}
        while "pipeline" not in dataset and isinstance(dataset.get("dataset"), dict):
            dataset = dataset["dataset"]
        size = _crop_size(dataset.get("pipeline"))
        if size:
            return size
    img = (cfg.model.get("backbone") or {}).get("img_size")
    if isinstance(img, int):
        return (img, img)
    return (224, 224)


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
            kept = [
                i for i in items if not (isinstance(i, dict) and (i.get("type") == "Pretrained" or "checkpoint" in i))
            ]
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


def test_key(model: Dict[str, Any], size: Tuple[int, int]) -> str:
    """Configs with the same key (model dict and input size) are checked once."""
    return json.dumps([model, list(size)], sort_keys=True, default=str)


def _build(cfg: Dict[str, Any], device: Optional[str] = None) -> torch.nn.Module:
    from mmpretrain.registry import MODELS

    if device is None:
        return MODELS.build(copy.deepcopy(cfg))
    with torch.device(device):
        return MODELS.build(copy.deepcopy(cfg))


def _batch(model: Any, size: Tuple[int, int], training: bool, seed: int) -> Tuple[torch.Tensor, List[Any]]:
    from mmpretrain.structures import DataSample

    num_classes = int(getattr(model.head, "num_classes", 2) or 2)
    mean = getattr(model.data_preprocessor, "mean", None)
    channels = int(mean.shape[0]) if isinstance(mean, torch.Tensor) and mean.dim() == 3 else 3  # LeNet: 1
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, (channels, *size), generator=g, dtype=torch.uint8) for _ in range(2)]
    samples = [DataSample().set_gt_label(i % num_classes) for i in range(2)]
    _seed(seed)
    data = model.data_preprocessor({"inputs": imgs, "data_samples": samples}, training)
    return data["inputs"], data["data_samples"]


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _loss_sum(losses: Dict[str, Any], deepest_only: bool) -> torch.Tensor:
    total = torch.zeros(())
    for k, v in losses.items():
        if "loss" not in k or (deepest_only and k.startswith("exit")):
            continue
        for t in v if isinstance(v, (list, tuple)) else [v]:
            total = total + t.mean()
    return total


def _at_size(model: Dict[str, Any], size: Tuple[int, int], own: Tuple[int, int]) -> Dict[str, Any]:
    """The model dict for inputs of ``size``: backbones that take ``img_size`` get it (others take any size)."""
    import inspect

    from mmpretrain.registry import MODELS

    if size == own:
        return model
    backbone = dict(model["backbone"])
    cls = MODELS.get(backbone.get("type"))
    if isinstance(cls, type) and "img_size" in inspect.signature(cls.__init__).parameters:
        backbone["img_size"] = size[0] if size[0] == size[1] else size
    return dict(model, backbone=backbone)


def _sizes(own: Tuple[int, int], small: int) -> List[Tuple[int, int]]:
    """``small``, then twice that, then the config's own size: sizes tried in turn until the plain model runs."""
    tried = [(s, s) for s in (small, 2 * small) if small and s < min(own)]
    return tried + [own]


def check_config(model: Dict[str, Any], own: Tuple[int, int], small: int, max_params: float) -> Dict[str, Any]:
    """Plain ImageClassifier vs SelfDistillClassifier (the two lines) on the same weights and batch, at the
    config's own input size (``small`` = 0) or at the smallest of ``small``, ``2 * small``, own that it takes."""
    import sd_plugin  # noqa: F401 - the first of the two lines: registers SelfDistillClassifier

    _quiet()
    try:
        n = sum(p.numel() for p in _build(dict(model, type="ImageClassifier"), "meta").parameters())
    except Exception:  # noqa: BLE001 - some backbones cannot be built on meta: counted on CPU below
        n = None
    if n is not None and n > max_params:
        return dict(status=SLOW, error=f"{n / 1e6:.0f} M parameters > --max-params (two copies + gradients)")
    errors = []
    for size in _sizes(own, small):
        plain_cfg = dict(_at_size(model, size, own), type="ImageClassifier")
        sd_cfg = dict(plain_cfg, type="SelfDistillClassifier")  # the second line
        try:
            _seed(0)
            plain = _build(plain_cfg)
            plain.init_weights()
            n = sum(p.numel() for p in plain.parameters())
            if n > max_params:
                return dict(status=SLOW, error=f"{n / 1e6:.0f} M parameters > --max-params (two copies + gradients)")
            initial = copy.deepcopy(plain.state_dict())  # the training forward below moves BN statistics
            inputs, samples = _batch(plain, size, True, 0)
            plain.train()
            _seed(1)
            with torch.no_grad():
                plain_loss = _loss_sum(plain(inputs, copy.deepcopy(samples), mode="loss"), False)
            break
        except Exception as e:  # noqa: BLE001 - the next size, or the report
            errors.append(f"at {size[0]}x{size[1]}: {type(e).__name__}: {e}"[:300])
            plain = None
    else:
        return dict(status=BROKEN, error=f"plain ImageClassifier {errors[-1]}"[:400], errors=errors)
    result: Dict[str, Any] = dict(params_m=round(n / 1e6, 2), size=list(size), own_size=list(own))
    if errors:
        result["smaller_sizes_failed"] = errors
    try:
        _seed(0)
        sd = _build(sd_cfg)
        missing, unexpected = sd.load_state_dict(initial, strict=False)  # the plain model's weights
        plain_names = {k for k, _ in plain.named_parameters()}
        exit_params = [(k, p) for k, p in sd.named_parameters() if k not in plain_names and p.requires_grad]
        result.update(num_exits=getattr(sd, "num_exits", None), exits=_describe_exits(sd))
        if unexpected or any(not k.startswith(_exit_prefixes(sd, plain)) for k in missing):
            return dict(result, status=FAIL, error=f"state dict keys differ: unexpected {unexpected[:3]}")
        if not exit_params:
            return dict(result, status=FAIL, error="no exit parameters")
        sd.train()
        _seed(1)
        losses = sd(inputs, copy.deepcopy(samples), mode="loss")
        deepest = _loss_sum(losses, True)
        result.update(plain_loss=plain_loss.item(), deepest_loss=deepest.item(), loss_exact=bool(deepest == plain_loss))
        total = _loss_sum(losses, False)
        if not torch.isfinite(total):
            return dict(result, status=FAIL, error=f"total loss is {float(total)}")
        total.backward()
        dead = [k for k, p in exit_params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
        if dead:
            return dict(
                result, status=FAIL, error=f"{len(dead)} exit parameters without a finite non-zero gradient: {dead[:3]}"
            )
        if not torch.allclose(deepest, plain_loss, rtol=1e-6, atol=0.0):
            return dict(
                result, status=FAIL, error=f"deepest loss {float(deepest)!r} != plain loss {float(plain_loss)!r}"
            )
        torch.optim.SGD([p for p in sd.parameters() if p.requires_grad], lr=1e-3).step()
        plain.load_state_dict({k: v for k, v in sd.state_dict().items() if k in initial}, strict=True)
        sd.eval()
        plain.eval()
        x, s = _batch(plain, size, False, 2)
        with torch.no_grad():
            got = torch.stack([d.pred_score for d in sd(x, copy.deepcopy(s), mode="predict")])
            want = torch.stack([d.pred_score for d in plain(x, copy.deepcopy(s), mode="predict")])
        if not torch.equal(got, want):
            diff = float((got - want).abs().max()) if got.shape == want.shape else f"shapes {got.shape} {want.shape}"
            return dict(result, status=FAIL, error=f"predict differs from the plain model (max |diff| {diff})")
        return dict(result, status=OK)
    except Exception as e:  # noqa: BLE001
        return dict(result, status=FAIL, error=f"{type(e).__name__}: {e}"[:400])


def _quiet() -> None:
    """mmengine's init logs and library warnings would bury the tool's own output."""
    import logging
    import warnings

    from mmengine.logging import MMLogger

    warnings.filterwarnings("ignore")
    MMLogger.get_current_instance().setLevel(logging.ERROR)


def _exit_prefixes(sd: Any, plain: Any) -> Tuple[str, ...]:
    plain_children = {n for n, _ in plain.named_children()}
    return tuple(f"{n}." for n, _ in sd.named_children() if n not in plain_children) or ("exit_",)


def _describe_exits(sd: Any) -> List[str]:
    points = getattr(sd, "exit_points", None) or []
    return [f"{getattr(p, 'module', p)}:{getattr(p, 'fmt', '')}" for p in points]
