"""Bad configs give ValueError/TypeError that name the problem and the fix."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch.nn as nn
from _mmp_helpers import load_model_cfg, packaged

pytestmark = pytest.mark.mmpretrain

RESNET_CIFAR = "resnet/resnet18_8xb16_cifar10.py"


def _build(cfg: Dict[str, Any], **options: Any) -> Any:
    from mmpretrain.registry import MODELS

    return MODELS.build(dict(cfg, type="SelfDistillClassifier", **options))


@pytest.mark.parametrize(
    "rel", ["mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py", "simclr/simclr_resnet50_16xb256-coslr-200e_in1k.py"]
)
def test_self_supervised_config_is_refused(rel: str) -> None:
    from mmengine import Config

    cfg = Config.fromfile(packaged(rel)).model.to_dict()
    cfg["backbone"]["depth"] = 18
    cfg["backbone"].pop("init_cfg", None)
    with pytest.raises(TypeError, match="(?i)self-supervised"):
        _build(cfg)


def test_backbone_without_stages_is_refused() -> None:
    from mmpretrain.registry import MODELS

    @MODELS.register_module(name="_SDTestFlatBackbone", force=True)
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: Any) -> Any:
            return (self.conv(x),)

    cfg = load_model_cfg(RESNET_CIFAR, {"backbone": {"type": "_SDTestFlatBackbone"}, "head.in_channels": 8})
    with pytest.raises(ValueError, match="backbone Flat.*stage_modules"):
        _build(cfg)


def test_stage_modules_is_the_way_out() -> None:
    cfg = load_model_cfg(RESNET_CIFAR)
    model = _build(cfg, stage_modules=["layer2", "layer3", "layer4"])
    assert [p.module for p in model.exit_points] == ["layer2", "layer3"]
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        _build(cfg, stage_modules=["layer1", "nope"])


@pytest.mark.parametrize("indices", [[3], [-5], [0, 7]])
def test_exit_index_out_of_range(indices: Any) -> None:
    with pytest.raises(ValueError, match="out of range"):
        _build(load_model_cfg(RESNET_CIFAR), exit_indices=indices)


def test_exit_indices_select_stages() -> None:
    model = _build(load_model_cfg(RESNET_CIFAR), exit_indices=[-2, 0])
    assert [p.module for p in model.exit_points] == ["layer1", "layer3"]


@pytest.mark.parametrize(
    "head, match",
    [
        # ClsHead (the backbone computes the logits), DeiTClsHead and the multi-label heads now work:
        # tests/mmpretrain/test_head_losses.py and test_multi_label.py.
        ({"type": "ContrastiveHead", "loss": {"type": "CrossEntropyLoss"}}, "ContrastiveHead is not a classification"),
    ],
)
def test_unusable_head(head: Dict[str, Any], match: str) -> None:
    cfg = load_model_cfg(RESNET_CIFAR)
    cfg["head"] = head
    with pytest.raises(TypeError, match=match):
        _build(cfg)


@pytest.mark.parametrize(
    "options, exc, match",
    [
        ({"temperature": 0}, ValueError, "temperature"),
        ({"kd_weight": -1.0}, ValueError, "kd_weight"),
        ({"hint_weight": "0.1"}, TypeError, "hint_weight"),
        ({"predict_exit": "middle"}, ValueError, "predict_exit"),
        ({"predict_exit": 9}, ValueError, "predict_exit=9"),
        ({"temprature": 3.0}, TypeError, "unexpected options \\['temprature'\\]"),
    ],
)
def test_invalid_options(options: Dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        _build(load_model_cfg(RESNET_CIFAR), **options)
