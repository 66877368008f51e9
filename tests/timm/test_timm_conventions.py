"""timm's own model checks, asserted on wrapped models over many architectures.

timm's ``tests/test_models.py`` checks every model's forward (``test_model_forward``), its config and head API
(``test_model_default_cfgs`` / ``_non_std``: ``num_features``, ``head_hidden_size``, ``forward_head(pre_logits=True)``,
``reset_classifier(0)`` pooled and ``reset_classifier(0, '')`` unpooled outputs, classifier and first-conv names in
the state dict) and ``forward_intermediates`` (``test_model_forward_intermediates``). The same properties must hold
for ``sd_plugin.wrap(model)``, and every output must be exactly the plain timm model's. Models are the smallest
variants at 32-64 px, chosen from ``timm.list_models`` with include / exclude filters, as timm's tests choose them.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from timm.layers import get_channel_dim, get_spatial_dim  # noqa: E402

import sd_plugin  # noqa: E402

pytestmark = pytest.mark.timm

NUM_CLASSES = 5
NEW_CLASSES = 3
DEFAULT_SIZE = 64
BATCH = 1

# timm's test-only models and the smallest real variant of other families (all pretrained=False, nothing downloads)
INCLUDE = [
    "test_*", "resnet10t", "resnetv2_18", "regnetx_002", "convnext_atto", "convnextv2_atto", "cs3darknet_focus_s",
    "dla46_c", "edgenext_xx_small", "efficientformerv2_s0", "efficientvit_b0", "efficientvit_m0",
    "ese_vovnet19b_slim_dw", "fasternet_t0", "ghostnet_050", "hgnetv2_b0", "inception_next_atto", "lcnet_035",
    "levit_128s", "mixer_s16_224", "mnasnet_050", "mobilenetv2_035", "mobilenetv3_small_050",
    "mobilenetv4_conv_small_035", "mobilevit_xxs", "poolformer_s12", "pvt_v2_b0", "repghostnet_050", "rexnet_100",
    "starnet_s050", "swiftformer_xs", "swin_tiny_patch4_window7_224", "deit_tiny_patch16_224", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "tinynet_e",
]  # fmt: skip
# timm's test models of a family already covered, and the heavier of the list above (run with the slow tests)
EXCLUDE = ["test_vit[234]", "test_convnext[23]", "test_efficientnet_*"]
SLOW = ["repvit_m0_9", "fastvit_t8", "gcvit_xxtiny", "test_vit[234]", "test_convnext[23]", "test_efficientnet_*"]

# create_model arguments that keep a model tiny (first matching pattern); input size: img_size, else DEFAULT_SIZE
SMALL = {
    "test_vit*": dict(img_size=32),
    "deit_*": dict(img_size=32, depth=4),
    "cait_*": dict(img_size=32, depth=4),
    "xcit_*": dict(img_size=32, depth=4),
    "mixer_*": dict(img_size=32),
    "swin_*": dict(img_size=64, window_size=2, depths=(1, 1, 1, 1), drop_path_rate=0.0),
    "levit_*": dict(img_size=64),
    "test_maxvit": dict(img_size=64),
    "test_coatnet": dict(img_size=64),
    "efficientformerv2_*": dict(img_size=64),
    "efficientvit_m*": dict(img_size=64),
    "gcvit_*": dict(img_size=64),
}

# timm's NON_STD_FILTERS (transformers and hybrids: no (N, C, H, W) contract for the unpooled output) that occur here
NON_STD = ["test_vit*", "deit*", "cait_*", "xcit_*", "*mixer_*", "levit*", "poolformer_*", "swiftformer_*"]
NON_STD += ["efficientformer*", "efficientvit_m*", "gcvit*"]
# timm's EARLY_POOL_MODELS: layers after the pooling, so reset_classifier(0, '') is not the unpooled features
EARLY_POOL = ("EfficientVit", "EfficientVitLarge", "FasterNet", "HighPerfGpuNet", "GhostNet", "MetaNeXt")
EARLY_POOL += ("MobileNetV3", "RepGhostNet", "VGG")
# timm's FEAT_INTER_FILTERS: the model modules whose forward_intermediates timm checks (those that occur here)
FEAT_INTER_MODULES = [
    "vision_transformer", "vision_transformer_relpos", "cait", "xcit", "deit", "swin_transformer", "maxxvit",
    "efficientnet", "mobilenetv3", "levit", "efficientformer_v2", "resnet", "regnet", "byobnet", "mlp_mixer",
    "vovnet", "rexnet", "resnetv2", "repghost", "repvit", "pvt_v2", "mambaout", "inception_next", "hgnet", "gcvit",
    "edgenext", "convnext", "starnet", "fasternet", "swiftformer", "ghostnet", "fastvit",
]  # fmt: skip

FAST_ARCHS: List[str] = timm.list_models(INCLUDE, exclude_filters=EXCLUDE)
SLOW_ARCHS: List[str] = timm.list_models(SLOW)
ARCHS = [pytest.param(n, id=n) for n in FAST_ARCHS] + [
    pytest.param(n, id=n, marks=pytest.mark.slow) for n in SLOW_ARCHS
]
INTER_ARCHS = [a for a in ARCHS if a.values[0] in timm.list_models(module=FEAT_INTER_MODULES)]


def _matches(name: str, patterns: List[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _kwargs(name: str) -> Dict[str, Any]:
    return next((dict(v) for k, v in SMALL.items() if fnmatch.fnmatch(name, k)), {})


def _size(name: str) -> int:
    return int(_kwargs(name).get("img_size", DEFAULT_SIZE))


@functools.cache
def _built(name: str) -> Tuple[nn.Module, sd_plugin.SelfDistillModel]:
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **_kwargs(name)).eval()
    size = _size(name)
    return plain, sd_plugin.wrap(copy.deepcopy(plain), input_size=(3, size, size)).eval()


def _pair(name: str) -> Tuple[nn.Module, sd_plugin.SelfDistillModel]:
    """A plain timm model and a wrapped copy with the same weights, both in eval mode (fresh copies)."""
    return copy.deepcopy(_built(name))


def _x(name: str, n: int = BATCH) -> torch.Tensor:
    size = _size(name)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _fmt(model: nn.Module) -> str:
    return str(getattr(model, "output_fmt", "NCHW"))


def test_enough_architectures() -> None:
    families = {timm.models.model_entrypoint(n).__module__ for n in FAST_ARCHS}
    assert len(FAST_ARCHS) >= 30 and len(families) >= 25, (len(FAST_ARCHS), sorted(families))


@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_forward_as_timm(name: str) -> None:
    """timm's test_model_forward: batch-first output without NaN, unchanged by gradient checkpointing."""
    plain, sd_model = _pair(name)
    x = _x(name)
    out = sd_model(x)
    assert out.shape == (BATCH, NUM_CLASSES) and not torch.isnan(out).any()
    assert torch.equal(out, plain(x))
    try:
        plain.set_grad_checkpointing()
    except Exception:  # timm: a model without checkpointing may raise; the wrapped one must do the same
        with pytest.raises(Exception):  # noqa: B017, PT011
            sd_model.set_grad_checkpointing()
        return
    sd_model.set_grad_checkpointing()
    torch.testing.assert_close(sd_model(x), out, rtol=1e-4, atol=1e-5)


def _spatial(t: torch.Tensor, fmt: str) -> Tuple[int, ...]:
    return tuple(t.shape[d] for d in get_spatial_dim(fmt))


def _same_call(plain: nn.Module, sd_model: nn.Module, fn: str, *args: Any) -> Any:
    """Call ``fn(*args)`` on both models from the same seed (a new classifier gets the same weights): the same
    exception type, or exactly the same output (returned)."""
    try:
        torch.manual_seed(2)
        expected = getattr(plain, fn)(*args)
    except Exception as err:  # e.g. EfficientViT: "Cannot disable pooling"
        with pytest.raises(type(err)):
            getattr(sd_model, fn)(*args)
        return None
    torch.manual_seed(2)
    got = getattr(sd_model, fn)(*args)
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), fn
    return got


@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_default_cfg_and_reset_classifier_as_timm(name: str) -> None:
    """timm's test_model_default_cfgs (and _non_std) on the wrapped model, then training after a classifier is back."""
    plain, sd_model = _pair(name)
    std = not _matches(name, NON_STD)
    assert sd_model.num_classes == plain.num_classes == NUM_CLASSES
    assert sd_model.num_features == plain.num_features > 0
    assert sd_model.head_hidden_size == plain.head_hidden_size > 0
    x, fmt = _x(name), _fmt(plain)

    # forward_features (unpooled) and forward_head(pre_logits=True)
    feats = _same_call(plain, sd_model, "forward_features", x)
    pre = sd_model.forward_head(feats, pre_logits=True)
    assert torch.equal(pre, plain.forward_head(feats, pre_logits=True))
    assert pre.shape[1] == sd_model.head_hidden_size
    if std:
        assert feats.shape[get_channel_dim(fmt)] == sd_model.num_features
    elif isinstance(feats, torch.Tensor):
        assert feats.shape[-1 if feats.ndim == 3 else 1] == sd_model.num_features

    # classifier and first conv named in the pretrained cfg are keys of the wrapped model's state dict
    state = sd_model.state_dict()
    for key in ("classifier", "first_conv"):
        names = sd_model.pretrained_cfg[key]
        for n in (names,) if isinstance(names, str) else names:
            assert f"{n}.weight" in state, (key, n)

    # reset_classifier(0): pooled features of width head_hidden_size, as pre_logits; no classifier anywhere
    _same_call(plain, sd_model, "reset_classifier", 0)
    assert sd_model.num_classes == plain.num_classes == 0
    pooled = _same_call(plain, sd_model, "forward", x)
    assert pooled.shape == pre.shape == (BATCH, sd_model.head_hidden_size)
    assert not any(k.startswith("sd_exits.") and ".fc." in k for k in sd_model.state_dict())
    with torch.enable_grad(), pytest.raises(ValueError, match=r"reset_classifier\(num_classes\)"):
        sd_model.train()(x)
    sd_model.eval()

    # reset_classifier(n): a classifier on the model and on every exit again, and training works
    _same_call(plain, sd_model, "reset_classifier", NEW_CLASSES)
    assert sd_model.num_classes == NEW_CLASSES
    _same_call(plain, sd_model, "forward", x)
    trained = copy.deepcopy(sd_model).train()  # a copy: training moves batch-norm statistics
    with torch.enable_grad():
        out = trained(_x(name, 2))
        assert [tuple(lg.shape) for lg in out.all_logits()] == [(2, NEW_CLASSES)] * (sd_model.num_exits + 1)
        sd_plugin.SelfDistillLoss()(out, torch.tensor([0, 2])).backward()

    # reset_classifier(0, ''): no pooling either; unpooled features of forward_features' size
    if _same_call(plain, sd_model, "reset_classifier", 0, "") is None and plain.num_classes != 0:
        return  # the timm model refuses to disable its pooling (EfficientViT), and so does the wrapped one
    unpooled = _same_call(plain, sd_model, "forward", x)
    if std and not isinstance(plain, tuple(getattr(timm.models, c) for c in EARLY_POOL)):
        assert unpooled.ndim == 4 and _spatial(unpooled, fmt) == _spatial(feats, fmt)
    assert sd_plugin.unwrap(sd_model) is sd_model.model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sd_model.model.modules())


@pytest.mark.parametrize("name", INTER_ARCHS)
@torch.no_grad()
def test_forward_intermediates_as_timm(name: str) -> None:
    """timm's test_model_forward_intermediates: one NCHW map per feature_info level, the last one forward_features."""
    plain, sd_model = _pair(name)
    if not hasattr(plain, "forward_intermediates"):
        pytest.skip(f"{name} has no forward_intermediates")
    x = _x(name)
    final, inter = sd_model.forward_intermediates(x, output_fmt="NCHW")
    final_p, inter_p = plain.forward_intermediates(x, output_fmt="NCHW")
    assert torch.equal(final, final_p) and len(inter) == len(inter_p)
    assert all(torch.equal(a, b) for a, b in zip(inter, inter_p))
    info = timm.models.FeatureInfo(sd_model.feature_info, len(sd_model.feature_info))
    assert len(info.channels()) >= 3 and len(inter) == len(info.channels())
    for channels, reduction, t in zip(info.channels(), info.reduction(), inter):
        assert t.shape[0] == BATCH and t.shape[1] == channels and not torch.isnan(t).any()
        assert all(s <= math.ceil(x.shape[-1] / reduction) + 1 for s in t.shape[2:])
    torch.testing.assert_close(final, sd_model.forward_features(x))


@torch.no_grad()
def test_no_classifier_features_from_every_exit_errors_only_where_logits_are_needed() -> None:
    plain, sd_model = _pair("test_resnet")
    x = _x("test_resnet", 2)
    blocks = {k: v.clone() for k, v in sd_model.exits_state_dict().items() if ".fc." not in k}
    sd_model.reset_classifier(0)
    plain.reset_classifier(0)
    assert all(isinstance(branch.fc, nn.Identity) for branch in sd_model.sd_exits)
    assert set(sd_model.exits_state_dict()) == set(blocks)  # the blocks stay, the classifiers are gone
    assert torch.equal(sd_model(x), plain(x))  # predict_exit='deepest': timm's pooled features

    for k in range(1, sd_model.num_exits + 1):  # predict_exit=k: exit k's pooled features
        sd_model.config.predict_exit = k
        feature = sd_model.exit_engine.run_to(k - 1, lambda: sd_model.model(x))
        expected = sd_model.sd_exits[k - 1].forward_features(feature)
        assert expected.shape == (2, sd_model.feature_dim) and torch.equal(sd_model(x), expected)
    sd_model.config.predict_exit = "ensemble"
    with pytest.raises(ValueError, match=r"^predict_exit='ensemble' needs the classifiers' logits"):
        sd_model(x)
    sd_model.config.predict_exit = "deepest"
    with torch.enable_grad(), pytest.raises(ValueError, match=r"^training needs the classifiers' logits") as err:
        sd_model.train()(x)
    assert "reset_classifier(num_classes) with num_classes >= 1 to train, or sd_plugin.unwrap(model)" in str(err.value)

    sd_model.reset_classifier(NEW_CLASSES)  # every exit follows the class count; its block is kept
    assert all(b.fc.in_features == sd_model.feature_dim and b.fc.out_features == NEW_CLASSES for b in sd_model.sd_exits)
    assert all(torch.equal(sd_model.exits_state_dict()[k], v) for k, v in blocks.items())
    with torch.enable_grad():
        out = sd_model.train()(x)
    assert out.num_exits == sd_model.num_exits and out.logits.shape == (2, NEW_CLASSES)
