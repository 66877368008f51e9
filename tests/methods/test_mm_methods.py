"""The methods on MMPretrain's route: Runner training with PS-KD's hook (save/resume bitwise) and CS-KD's sampler."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import sd_plugin  # noqa: F401  (registers the MMPretrain components)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from _rel_helpers import SimulatedCrash, make_image_folder, mm_config, sd_resnet  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("img"), num_classes=2, per_class=6)


def _epoch_config(data_root, work_dir, model, epochs, sampler=None, hooks=()):
    cfg = mm_config(data_root, work_dir, model=model, batch_size=4, sampler=sampler)
    cfg["custom_imports"] = dict(imports=["sd_plugin", "_rel_helpers"], allow_failed_imports=False)
    cfg["train_cfg"] = dict(by_epoch=True, max_epochs=epochs, val_interval=10**6)
    cfg["param_scheduler"] = [dict(type="MultiStepLR", by_epoch=True, milestones=[1], gamma=0.1)]
    cfg["default_hooks"]["checkpoint"] = dict(type="CheckpointHook", interval=1, by_epoch=True)
    cfg["custom_hooks"] = list(hooks)
    cfg["log_level"] = "WARNING"
    return cfg


def _runner(cfg):
    from mmengine.config import Config
    from mmengine.runner import Runner

    return Runner.from_cfg(Config(copy.deepcopy(cfg)))


def _past(runner):
    return runner.model.distill_loss.past


@pytest.mark.slow
def test_pskd_hook_drives_progress_and_resume_restores_past_predictions_bitwise(tmp_path, data_root):
    model = sd_resnet(exit_indices=[], pskd_alpha=0.8)
    hooks = [dict(type="ProgressiveSelfKDHook")]
    straight = _runner(_epoch_config(data_root, tmp_path / "a", model, 3, hooks=hooks))
    straight.train()
    assert straight.model.distill_loss.progress == pytest.approx(2 / 3)
    seen = _past(straight).seen  # capacity grows by doubling: rows 0..11 are the 12 training images
    assert bool(seen[:12].all()) and not bool(seen[12:].any()) and _past(straight).probs.shape[1] == 2
    # The same run stopped after epoch 2 (a crash once its checkpoint is written), then resumed to the end.
    crash = [*hooks, dict(type="CrashHook", after_epoch=2)]
    first = _runner(_epoch_config(data_root, tmp_path / "b", model, 3, hooks=crash))
    with pytest.raises(SimulatedCrash):
        first.train()
    saved = torch.load(tmp_path / "b" / "epoch_2.pth", weights_only=False)["sd_plugin_pskd"]["pskd_past"]
    assert torch.equal(saved["probs"], _past(first).probs)
    cfg = _epoch_config(data_root, tmp_path / "b", model, 3, hooks=hooks)
    cfg["resume"] = True
    resumed = _runner(cfg)
    resumed.train()
    assert torch.equal(_past(resumed).probs, _past(straight).probs)
    assert torch.equal(resumed.model.head.fc.weight, straight.model.head.fc.weight)
    assert "sd_plugin_pskd" not in "".join(resumed.model.state_dict())  # model weights stay plain


@pytest.mark.slow
def test_pskd_without_the_hook_says_what_to_add(tmp_path, data_root):
    runner = _runner(_epoch_config(data_root, tmp_path, sd_resnet(exit_indices=[], pskd_alpha=0.8), 1))
    with pytest.raises(ValueError, match="ProgressiveSelfKDHook"):
        runner.train()


@pytest.mark.slow
def test_cskd_trains_with_the_class_pair_sampler_with_exits_and_label_smoothing(tmp_path, data_root):
    model = sd_resnet(cskd_weight=1.0)
    model["head"]["loss"] = dict(type="LabelSmoothLoss", label_smooth_val=0.1, mode="original")
    seen = []

    cfg = _epoch_config(data_root, tmp_path, model, 1, sampler=dict(type="ClassPairSampler", seed=0))
    runner = _runner(cfg)
    original = runner.model.loss

    def spy(inputs, data_samples):
        seen.append(torch.cat([d.gt_label for d in data_samples]))
        out = original(inputs, data_samples)
        seen.append(out)
        return out

    runner.model.loss = spy
    runner.train()
    labels = [x for x in seen if isinstance(x, torch.Tensor)]
    assert labels and all(torch.equal(y[0::2], y[1::2]) for y in labels)
    terms = [x for x in seen if isinstance(x, dict)][0]
    assert {"loss_ce", "loss_cskd", "exit1_loss_kd"} <= set(terms) and terms["loss_cskd"].item() >= 0


def test_cskd_without_the_sampler_says_what_to_use():
    from mmpretrain.registry import MODELS

    from sd_plugin.core import SelfDistillOutput

    torch.manual_seed(0)
    model = MODELS.build(sd_resnet(exit_indices=[], cskd_weight=1.0))
    out = SelfDistillOutput(torch.randn(4, 2), torch.zeros(4, 64), [], [])
    with pytest.raises(ValueError, match="ClassPairSampler"):
        model.distill_loss(out, torch.tensor([0, 1, 0, 1]))
