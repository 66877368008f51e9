"""The timm adapter's contract: outputs, state dict, unwrap, pretrained weights, protocol, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

import sd_plugin  # noqa: E402
from sd_plugin.core import MultiExitModel, SelfDistillConfig, StopForward  # noqa: E402
from sd_plugin.timm_adapter import SelfDistillModel, unwrap, wrap  # noqa: E402

pytestmark = pytest.mark.timm

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _resnet(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=7, **kwargs)


def _vit(depth: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=7, img_size=32, depth=depth)


def test_top_level_api_and_defaults() -> None:
    sd_model = sd_plugin.wrap(_resnet(), input_size=(3, 32, 32))
    assert isinstance(sd_model, sd_plugin.SelfDistillModel)
    assert sd_model.config == SelfDistillConfig()
    assert sd_model.kind == "stage"
    # one exit after every stage but the last; the stem ('act1') is no stage
    assert [p.module for p in sd_model.exit_points] == ["layer1", "layer2", "layer3"]
    assert [p.fmt for p in sd_model.exit_points] == ["NCHW"] * 3
    assert [p.channels for p in sd_model.exit_points] == [
        sd_model.model.get_submodule(f"layer{i}")[-1].conv3.out_channels
        if hasattr(sd_model.model.get_submodule(f"layer{i}")[-1], "conv3")
        else sd_model.model.get_submodule(f"layer{i}")[-1].conv2.out_channels
        for i in (1, 2, 3)
    ]
    assert sd_model.feature_dim == sd_model.model.get_classifier().in_features


def test_vit_exits_at_quarter_depths_and_override() -> None:
    sd_model = wrap(_vit(depth=8))
    assert sd_model.kind == "block"
    assert [p.module for p in sd_model.exit_points] == ["blocks.1", "blocks.3", "blocks.5"]
    assert all(p.fmt == "NLC" for p in sd_model.exit_points)
    assert sd_model.input_size == (3, 32, 32)  # from patch_embed.img_size
    custom = wrap(_vit(depth=8), exit_indices=[0, -2])
    assert [p.module for p in custom.exit_points] == ["blocks.0", "blocks.6"]


def test_options_reach_config_and_loss() -> None:
    sd_model = wrap(_resnet(), input_size=(3, 32, 32), temperature=4.0, kd_weight=0.5, exit_indices=[1])
    assert sd_model.config.temperature == 4.0 and sd_model.config.kd_weight == 0.5
    assert sd_model.num_exits == 1
    with pytest.raises(TypeError, match="unknown option.*temprature"):
        wrap(_resnet(), input_size=(3, 32, 32), temprature=4.0)


def test_training_output_is_one_pass_and_matches_plain_model() -> None:
    model = _resnet()
    sd_model = wrap(model, input_size=(3, 32, 32)).train()
    calls = []
    handle = model.layer4.register_forward_hook(lambda m, a, o: calls.append(1))
    torch.manual_seed(1)
    out = sd_model(X)
    handle.remove()
    assert len(calls) == 1
    assert isinstance(out, sd_plugin.SelfDistillOutput) and out.num_exits == 3
    # teacher features are the classifier's input: the classifier applied to them gives the logits
    torch.testing.assert_close(model.get_classifier()(out.features), out.logits)


def test_soft_targets_and_eval_tensor_error() -> None:
    sd_model = wrap(_resnet(), input_size=(3, 32, 32)).train()
    criterion = sd_plugin.SelfDistillLoss(label_smoothing=0.1)
    mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=7)
    x, y = mixup(X.clone(), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 7)
    loss = criterion(sd_model(x), y)
    loss.backward()
    assert set(criterion.last_terms) >= {"loss_ce", "exit1_loss_kd", "exit3_loss_hint"}
    sd_model.eval()
    with pytest.raises(TypeError, match="SelfDistillOutput.*train mode"):
        criterion(sd_model(X), torch.tensor([0, 1, 2, 3]))


def test_state_dict_keys_and_plain_checkpoint(tmp_path: object) -> None:
    model = _resnet()
    plain_keys = list(model.state_dict())
    sd_model = wrap(model, input_size=(3, 32, 32))
    keys = list(sd_model.state_dict())
    assert keys[: len(plain_keys)] == plain_keys
    assert all(k.startswith("sd_exits.") for k in keys[len(plain_keys) :])

    other = _resnet()
    torch.nn.init.normal_(other.fc.weight)
    result = sd_model.load_state_dict(other.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("sd_exits.") for k in result.missing_keys)
    torch.testing.assert_close(sd_model.model.fc.weight, other.fc.weight, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="sd_exits"):
        sd_model.load_state_dict(other.state_dict())

    # round trip of the full state dict, and of the exits alone
    fresh = wrap(_resnet(), input_size=(3, 32, 32))
    assert fresh.load_state_dict(sd_model.state_dict()).missing_keys == []
    fresh2 = wrap(_resnet(), input_size=(3, 32, 32))
    fresh2.load_exits_state_dict(sd_model.exits_state_dict())
    for a, b in zip(fresh2.sd_exits.state_dict().values(), sd_model.sd_exits.state_dict().values()):
        assert torch.equal(a, b)
    fresh2.load_model_state_dict(other.state_dict())
    assert torch.equal(fresh2.model.fc.weight, other.fc.weight)


def test_unwrap_round_trip_exact() -> None:
    model = _resnet().eval()
    keys = list(model.state_dict())
    sd_model = wrap(model, input_size=(3, 32, 32))
    sd_model.train()
    sd_model(X)  # a training forward must not leave hooks behind
    sd_plugin.SelfDistillLoss()(sd_model(X), torch.arange(len(X)) % 2).backward()  # one real training step
    torch.optim.SGD(sd_model.parameters(), lr=0.1).step()
    plain = unwrap(sd_model.eval())
    assert plain is model and sd_model.unwrap() is model
    # Nothing of sd_plugin is left: a freshly created timm model with the trained weights (strict) has the same
    # modules and gives the same outputs, in eval and in train mode.
    fresh = _resnet()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert list(plain.state_dict()) == keys and type(plain) is type(fresh)
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in fresh.named_modules()]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(X), fresh.eval()(X))
        assert torch.equal(plain.train()(X), fresh.train()(X))
    with pytest.raises(TypeError, match="sd_plugin.wrap"):
        unwrap(model)


def test_pretrained_from_local_file(tmp_path: object) -> None:
    path = str(tmp_path) + "/test_resnet.pth"  # type: ignore[operator]
    torch.manual_seed(0)
    source = timm.create_model("test_resnet").eval()  # the pretrained config's 1000 classes: the head loads too
    torch.save(source.state_dict(), path)
    loaded = timm.create_model("test_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    via_checkpoint = timm.create_model("test_resnet", checkpoint_path=path)
    with torch.no_grad():
        expected = source(X)
    for model in (loaded, via_checkpoint):
        sd_model = wrap(model, input_size=(3, 32, 32)).eval()
        with torch.no_grad():
            assert torch.equal(sd_model(X), expected)
    # fine-tuning to fewer classes: timm re-initialises the head, the body keeps the file's weights
    tuned = wrap(
        timm.create_model("test_resnet", pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=path))
    )
    assert torch.equal(tuned.model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert tuned.sd_exits[0].fc.out_features == 7


def test_multi_exit_protocol_and_early_exit_hook() -> None:
    sd_model = wrap(_resnet(), input_size=(3, 32, 32)).eval()
    assert isinstance(sd_model, MultiExitModel)
    tapped = sd_model.tapped_module()
    seen = {}

    def keep_two(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        seen["feature"] = output
        return output[:2]

    point = sd_model.exit_points[0]
    handle = tapped.get_submodule(point.module).register_forward_hook(keep_two)
    with torch.no_grad():
        logits = sd_model.forward_deepest(X)
    handle.remove()
    assert logits.shape == (2, 7)  # the rest of the model ran on the smaller batch
    with torch.no_grad():
        assert sd_model.forward_exit(0, seen["feature"]).shape == (4, 7)

    def stop(module: nn.Module, args: object, output: torch.Tensor) -> None:
        raise StopForward

    handle = tapped.get_submodule(point.module).register_forward_hook(stop)
    with pytest.raises(StopForward):
        sd_model.forward_deepest(X)
    handle.remove()
    with pytest.raises(ValueError, match="out of range"):
        sd_model.forward_exit(3, seen["feature"])


def test_predict_exit_options() -> None:
    sd_model = wrap(_resnet(), input_size=(3, 32, 32), predict_exit="ensemble").eval()
    with torch.no_grad():
        train_out = sd_model.forward_train(X)
        ens = sd_model(X)
        torch.testing.assert_close(ens.exp(), train_out.ensemble_probs())
        sd_model.config.predict_exit = 1
        torch.testing.assert_close(sd_model(X), train_out.exit_logits[0])
    with pytest.raises(ValueError, match="predict_exit=9"):
        wrap(_resnet(), input_size=(3, 32, 32), predict_exit=9)


def test_errors_name_problem_and_fix() -> None:
    with pytest.raises(ValueError, match="num_classes=0.*num_classes > 0"):
        wrap(timm.create_model("test_resnet", num_classes=0), input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="exit index 3 is out of range"):
        wrap(_resnet(), input_size=(3, 32, 32), exit_indices=[3])
    with pytest.raises(TypeError, match="exit_indices must hold ints"):
        wrap(_resnet(), input_size=(3, 32, 32), exit_indices=[1.0])
    with pytest.raises(ValueError, match="input_size"):
        wrap(_vit(), input_size=(1, 32, 32))
    with pytest.raises(TypeError, match="already wrapped"):
        SelfDistillModel(wrap(_resnet(), input_size=(3, 32, 32)))

    class NoFeatures(nn.Module):
        num_classes = 7

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 7)

        def get_classifier(self) -> nn.Module:
            return self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x).mean((2, 3)))

    with pytest.raises(ValueError, match="cannot find where to put exits in NoFeatures.*exit_indices"):
        wrap(NoFeatures(), input_size=(3, 32, 32))
    # feature_info naming a module that does not exist: the engine finds the stages from the probe instead.
    model = _resnet()
    model.feature_info = [dict(module="layer1", num_chs=32, reduction=4), dict(module="nope", num_chs=32, reduction=8)]
    assert [p.module for p in wrap(model, input_size=(3, 32, 32)).exit_points] == ["layer1", "layer2", "layer3"]
