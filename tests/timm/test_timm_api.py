"""A wrapped timm model is still a timm model: timm's own helpers give what they give on the plain model.

Each check compares ``sd_plugin.wrap(model)`` with an identical plain timm model (same seed, same weights)
through timm's own functions (``resolve_data_config``, ``create_optimizer_v2(layer_decay=...)``,
``set_grad_checkpointing``, ``reset_classifier``), over six architecture families.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from timm.data import resolve_data_config  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import sd_plugin  # noqa: E402

pytestmark = pytest.mark.timm

# (architecture, create_model kwargs, input size): CNN, ViT, Swin, ConvNeXt, EfficientNet and hybrids, as timm's
# tiny test variants (fast) and as real small models (slow). No stochastic depth (Swin has it by default), so a step
# with and without gradient checkpointing computes the same thing.
_SWIN = dict(img_size=64, window_size=2, drop_path_rate=0.0)
FAST = [  # flattened-stage checkpointing (ResNet, EfficientNet), tokens (ViT), channels-last (Swin)
    ("test_resnet", {}, 32),
    ("test_vit", dict(img_size=32), 32),
    ("swin_tiny_patch4_window7_224", dict(_SWIN, depths=(1, 1, 1, 1), embed_dim=24), 64),
    ("test_efficientnet", {}, 32),
]
SLOW = [
    ("resnet18", {}, 32),
    ("vit_tiny_patch16_224", dict(img_size=32), 32),
    ("swin_tiny_patch4_window7_224", dict(_SWIN, depths=(1, 1, 2, 1)), 64),
    ("convnext_atto", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("coatnet_nano_rw_224", dict(img_size=64), 64),
    ("levit_128s", dict(img_size=64), 64),
]
ARCHS = [pytest.param(*a, id=a[0] + ("_small" if a[0].startswith("swin") else "")) for a in FAST] + [
    pytest.param(*a, id=a[0], marks=pytest.mark.slow) for a in SLOW
]


def _pair(name: str, kwargs: Dict[str, Any], size: int) -> Tuple[nn.Module, sd_plugin.SelfDistillModel]:
    """A plain model and a wrapped copy with the same weights."""
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=10, **kwargs)
    return plain, sd_plugin.wrap(copy.deepcopy(plain), input_size=(3, size, size))


def _x(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _first(head: Any) -> nn.Module:
    """The main classifier of ``get_classifier()`` (distilled models give (head, head_dist))."""
    return head[0] if isinstance(head, tuple) else head


def _exit_params(sd_model: sd_plugin.SelfDistillModel) -> Dict[str, nn.Parameter]:
    return {n: p for n, p in sd_model.named_parameters() if n.startswith("sd_exits.")}


@pytest.mark.parametrize("name,kwargs,size", ARCHS)
def test_config_features_and_classifier_match_the_plain_model(name: str, kwargs: Dict[str, Any], size: int) -> None:
    plain, sd_model = _pair(name, kwargs, size)
    assert resolve_data_config(model=sd_model) == resolve_data_config(model=plain)
    assert sd_model.pretrained_cfg == plain.pretrained_cfg and sd_model.default_cfg == plain.default_cfg
    assert sd_model.num_classes == plain.num_classes == 10
    assert sd_model.num_features == plain.num_features
    assert sd_model.feature_info is sd_model.model.feature_info
    assert _first(sd_model.get_classifier()) is _first(sd_model.model.get_classifier())
    # unknown public attributes come from the timm model (e.g. the global pool type, the stem/stage modules)
    assert sd_model.head_hidden_size == plain.head_hidden_size
    plain.eval(), sd_model.eval()
    x = _x(size)
    with torch.no_grad():
        feats = plain.forward_features(x)
        assert torch.equal(sd_model.forward_features(x), feats)
        assert torch.equal(sd_model.forward_head(feats), plain.forward_head(feats))
        assert torch.equal(sd_model.forward_head(feats, pre_logits=True), plain.forward_head(feats, pre_logits=True))
        if hasattr(plain, "forward_intermediates"):
            final, inter = sd_model.forward_intermediates(x)
            final_p, inter_p = plain.forward_intermediates(x)
            assert torch.equal(final, final_p) and len(inter) == len(inter_p)
            assert all(torch.equal(a, b) for a, b in zip(inter, inter_p))


def _groups_by_param(optimizer: torch.optim.Optimizer) -> Dict[int, List[Dict[str, Any]]]:
    found: Dict[int, List[Dict[str, Any]]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            found.setdefault(id(p), []).append(group)
    return found


@pytest.mark.parametrize("name,kwargs,size", ARCHS)
def test_layer_decay_groups_and_no_weight_decay(name: str, kwargs: Dict[str, Any], size: int) -> None:
    plain, sd_model = _pair(name, kwargs, size)
    opt_p = create_optimizer_v2(plain, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    opt_s = create_optimizer_v2(sd_model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    scales_p = {g["lr_scale"] for g in opt_p.param_groups}
    scales_s = {g["lr_scale"] for g in opt_s.param_groups}
    assert len(scales_p) > 2 and scales_s == scales_p  # layer decay took effect, with the plain model's layers
    assert len(opt_s.param_groups) >= len(opt_p.param_groups)

    # every parameter in exactly one group; the timm model's parameters get exactly their plain lr scale and decay
    by_param_s, by_param_p = _groups_by_param(opt_s), _groups_by_param(opt_p)
    assert all(len(by_param_s[id(p)]) == 1 for p in sd_model.parameters())
    plain_params = dict(plain.named_parameters())
    for n, p in sd_model.model.named_parameters():
        (gs,), (gp,) = by_param_s[id(p)], by_param_p[id(plain_params[n])]
        assert (gs["lr_scale"], gs["weight_decay"]) == (gp["lr_scale"], gp["weight_decay"]), n

    # each exit learns at the rate of the deepest layer of the stage it reads from
    for k, point in enumerate(sd_model.exit_points):
        stage = [p for n, p in plain.named_parameters() if n.startswith(point.module + ".")]
        expected = min(by_param_p[id(p)][0]["lr_scale"] for p in stage) if stage else None
        deepest = max(by_param_p[id(p)][0]["lr_scale"] for p in stage)
        exit_params = [p for n, p in _exit_params(sd_model).items() if n.startswith(f"sd_exits.{k}.")]
        assert exit_params and expected is not None
        assert {by_param_s[id(p)][0]["lr_scale"] for p in exit_params} == {deepest}, point.module

    # no_weight_decay: the plain model's names, as named_parameters names them in the wrapper
    plain_nwd = plain.no_weight_decay() if hasattr(plain, "no_weight_decay") else set()
    assert sd_model.no_weight_decay() >= {"model." + n for n in plain_nwd}
    for pattern in plain_nwd:
        for n, _ in plain.named_parameters():
            if fnmatch.fnmatch(n, pattern):
                assert by_param_s[id(sd_model.get_parameter("model." + n))][0]["weight_decay"] == 0.0


def _step(sd_model: sd_plugin.SelfDistillModel, x: torch.Tensor, exits_only: bool = False) -> None:
    sd_model.train()
    sd_model.zero_grad(set_to_none=True)
    out = sd_model(x)
    if exits_only:
        sum(lg.square().mean() for lg in out.exit_logits).backward()
    else:
        sd_plugin.SelfDistillLoss()(out, torch.arange(x.shape[0]) % 10).backward()


@pytest.mark.parametrize("name,kwargs,size", ARCHS)
def test_grad_checkpointing_trains_every_exit(name: str, kwargs: Dict[str, Any], size: int) -> None:
    _, sd_model = _pair(name, kwargs, size)
    reference = copy.deepcopy(sd_model)
    sd_model.set_grad_checkpointing(True)
    x = _x(size, n=4)
    # checkpointing is on: the deepest exit's stage runs again during backward (its last conv/linear: 2 calls)
    stage = sd_model.model.get_submodule(sd_model.exit_points[-1].module)
    last = [m for m in stage.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    calls: List[int] = []
    handle = last.register_forward_pre_hook(lambda *a: calls.append(1))
    for exits_only in (False, True):  # the full loss, then the exits' outputs alone
        _step(reference, x, exits_only)
        calls.clear()
        _step(sd_model, x, exits_only)
        assert len(calls) == 2
        # same gradients as without checkpointing, on the exits and on the backbone they read from
        for n, p in sd_model.named_parameters():
            ref = reference.get_parameter(n)
            assert (p.grad is None) == (ref.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=n)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _exit_params(sd_model).values())
    handle.remove()
    first = sd_model.exit_points[0].module  # the exits' losses reach the backbone through checkpointed stages
    grads = [p.grad for n, p in sd_model.model.named_parameters() if n.startswith(first + ".") and p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name,kwargs,size", ARCHS)
def test_reset_classifier_resets_every_exit(name: str, kwargs: Dict[str, Any], size: int) -> None:
    plain, sd_model = _pair(name, kwargs, size)
    before = {n: p.clone() for n, p in sd_model.named_parameters() if ".fc." not in n}
    sd_model.reset_classifier(5)
    plain.reset_classifier(5)
    assert sd_model.num_classes == 5
    assert all(branch.fc.out_features == 5 for branch in sd_model.sd_exits)
    x = _x(size, n=3)
    _step(sd_model, x.clone())
    out = sd_model(x)
    assert [tuple(lg.shape) for lg in out.all_logits()] == [(3, 5)] * (sd_model.num_exits + 1)
    sd_model.eval()
    assert sd_model(x).shape == (3, 5)
    # the exits' blocks are kept (only the classifiers are new), and the state dict is the plain model's plus exits
    assert all(n in dict(sd_model.named_parameters()) for n in before)
    assert set(sd_plugin.unwrap(sd_model).state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("bad", [-1, True, 2.0])
def test_reset_classifier_rejects_a_bad_class_count(bad: Any) -> None:
    _, sd_model = _pair("test_resnet", {}, 32)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0 \(0 removes the classifiers"):
        sd_model.reset_classifier(bad)
    assert sd_model.num_classes == 10  # nothing changed (reset_classifier(0): tests/timm/test_timm_conventions.py)


def test_attribute_forwarding_edges() -> None:
    _, sd_model = _pair("test_vit", dict(img_size=32), 32)
    assert sd_model.global_pool == sd_model.model.global_pool  # forwarded
    assert sd_model.sd_exits is sd_model._modules["sd_exits"]  # nn.Module's own lookup first
    with pytest.raises(AttributeError, match="nor has the wrapped VisionTransformer"):
        sd_model.no_such_attribute  # noqa: B018
    with pytest.raises(AttributeError):
        sd_model._private_flag  # noqa: B018 - private names are never forwarded
    assert not hasattr(sd_model, "_private_flag")
    bare = sd_plugin.SelfDistillModel.__new__(sd_plugin.SelfDistillModel)  # as during __init__ or unpickling
    with pytest.raises(AttributeError):  # no recursion before nn.Module.__init__ or before ``model`` is set
        bare.num_layers  # noqa: B018
    cfg = dict(sd_model.pretrained_cfg, mean=(0.1, 0.2, 0.3))
    sd_model.pretrained_cfg = cfg  # timm's helpers set it: it lands on the timm model
    assert sd_model.model.pretrained_cfg is cfg and resolve_data_config(model=sd_model)["mean"] == (0.1, 0.2, 0.3)
