"""Machinery of ``tools/coverage_mmpretrain.py``: which packaged configs count, their input size, and the check.

What counts: every config file under mmpretrain's packaged ``.mim/configs`` (``_base_`` excepted) whose ``model.type``
is :class:`~mmpretrain.models.ImageClassifier` or a registered subclass of it, with a head. Everything else is listed
with the reason it does not count (self-supervised pre-training algorithms, multimodal models, retrievers, detection
benchmarks, headless feature-extraction configs, helper files). Configs that mmengine cannot load are read again
from their model base file: when that says ``ImageClassifier`` they count, as failures of mmpretrain itself.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
from typing import Any, Dict, Optional, Tuple

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
    for base in re.findall(r"['\"]([^'\"]+\.py)['\"]", text):
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        t = _base_model_type(base_path) if os.path.isfile(base_path) else None
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
        if counts and not cfg.model.get("head"):
            counts, why = False, "ImageClassifier without a head (a feature-extraction config: it cannot classify)"
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
    """The input size of a config: the backbone's ``img_size`` where the config sets one (a model built for 384 px
    whose inherited training pipeline still crops 224, e.g. TinyViT-21M-384px), else its train pipeline's crop, else
    the test pipeline's, else 224."""
    img = (cfg.model.get("backbone") or {}).get("img_size")
    if isinstance(img, int):
        return (img, img)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
        return (int(img[0]), int(img[1]))
    for loader in ("train_dataloader", "test_dataloader", "val_dataloader"):
        dataset = (cfg.get(loader) or {}).get("dataset") or {}
        while "pipeline" not in dataset and isinstance(dataset.get("dataset"), dict):
            dataset = dataset["dataset"]
        size = _crop_size(dataset.get("pipeline"))
        if size:
            return size
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


def test_key(model: Dict[str, Any], size: Tuple[int, int], small: int) -> str:
    """Configs with the same key are checked once: the same model dict and input size; with ``--size`` (``small``
    below the config's own size), model dicts that differ only in the backbone's ``img_size``, which it replaces."""
    if small and small < min(size):
        model = dict(model, backbone={k: v for k, v in model["backbone"].items() if k != "img_size"})
        return json.dumps([model, "small", small], sort_keys=True, default=str)
    return json.dumps([model, list(size)], sort_keys=True, default=str)
