"""``SaveStrippedCheckpointHook`` in a real mmengine Runner: every checkpoint, ``save_best`` ones included, gets a
copy without the exits that the plain config loads with ``strict=True``."""

from __future__ import annotations

import pytest
import torch
from _rel_helpers import augmented_epoch_config, make_image_folder, sd_resnet, tiny_resnet, write_config
from _rel_run import run_mm_inprocess

pytestmark = pytest.mark.mmpretrain


@pytest.mark.slow
def test_every_checkpoint_and_the_best_get_a_stripped_copy(tmp_path):
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=4)
    work = tmp_path / "wd"
    cfg = augmented_epoch_config(data, work, model=sd_resnet(), max_epochs=2, num_workers=0)
    cfg["val_evaluator"] = dict(type="CallCountMetric")  # 1.0, then 2.0: a new best at each epoch
    cfg["default_hooks"]["checkpoint"].update(save_best="count", rule="greater")
    cfg["custom_hooks"].append(dict(type="SaveStrippedCheckpointHook"))
    run_mm_inprocess(write_config(cfg, tmp_path / "c.py"), name="stripped_real_runner")

    names = sorted(p.name for p in work.glob("*.pth"))
    assert names == [
        "best_count_epoch_2.pth",
        "best_count_epoch_2_stripped.pth",  # the epoch-1 best and its stripped copy are both gone
        "epoch_1.pth",
        "epoch_1_stripped.pth",
        "epoch_2.pth",
        "epoch_2_stripped.pth",
    ]
    from mmpretrain.registry import MODELS

    plain = MODELS.build(tiny_resnet())
    for full in ("best_count_epoch_2", "epoch_1", "epoch_2"):
        state = torch.load(work / f"{full}.pth", map_location="cpu", weights_only=False)["state_dict"]
        stripped = torch.load(work / f"{full}_stripped.pth", weights_only=True)
        kept = {k: v for k, v in state.items() if not k.startswith(("exit_necks.", "exit_heads."))}
        assert len(kept) < len(state) and stripped["state_dict"].keys() == kept.keys()
        assert all(torch.equal(stripped["state_dict"][k], v) for k, v in kept.items()), full
        assert stripped["meta"]["sd_plugin_stripped"] is True
        plain.load_state_dict(stripped["state_dict"], strict=True)
    epoch1 = torch.load(work / "epoch_1_stripped.pth", weights_only=True)["state_dict"]
    best = torch.load(work / "best_count_epoch_2_stripped.pth", weights_only=True)["state_dict"]
    assert not all(torch.equal(epoch1[k], best[k]) for k in best)  # the best copy holds epoch 2's weights
