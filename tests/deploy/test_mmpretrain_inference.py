"""MMPretrain inference of a self-distilled model: no exit runs unless asked for; early exit by config."""

import gc
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("mmpretrain")
from mmengine.config import Config  # noqa: E402
from mmpretrain.apis import ImageClassificationInferencer  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402

import sd_plugin  # noqa: E402, F401
from sd_plugin.deploy import EarlyExitModel, ExitPolicy, collect_exit_logits, strip_checkpoint  # noqa: E402
from sd_plugin.mmpretrain_adapter import MultiExitAccuracy  # noqa: E402
from sd_plugin.mmpretrain_adapter._early_exit_infer import exit_scores_requested  # noqa: E402

pytestmark = pytest.mark.mmpretrain

MODEL = dict(
    backbone=dict(type="ResNet_CIFAR", depth=18, stem_channels=8, base_channels=8, out_indices=(3,)),
    neck=dict(type="GlobalAveragePooling"),
    head=dict(type="LinearClsHead", num_classes=4, in_channels=64, loss=dict(type="CrossEntropyLoss")),
    data_preprocessor=dict(num_classes=4, mean=[120.0, 115.0, 100.0], std=[60.0, 58.0, 62.0], to_rgb=True),
)
PIPELINE = [dict(type="LoadImageFromFile"), dict(type="PackInputs")]


def _config(path, model_type, **extra):
    cfg = dict(
        model=dict(type=model_type, **MODEL, **extra),
        test_dataloader=dict(dataset=dict(type="CustomDataset", data_root="", pipeline=PIPELINE)),
        custom_imports=dict(imports=["sd_plugin"], allow_failed_imports=False),
    )
    Config(cfg).dump(str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    model = MODELS.build(dict(type="SelfDistillClassifier", **MODEL))
    with torch.no_grad():
        for p in [*model.exit_necks.parameters(), *model.exit_heads.parameters(), *model.head.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
        model.train()
        model.extract_feat(torch.randn(8, 3, 32, 32))
    meta = {"dataset_meta": {"classes": ["a", "b", "c", "d"]}}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp / "sd.pth")
    strip_checkpoint(tmp / "sd.pth", tmp / "plain.pth")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    return tmp, images


def _count_exit_calls(model):
    calls: Counter = Counter()
    for name in ("exit_necks", "exit_heads"):
        for i, m in enumerate(getattr(model, name)):
            m.register_forward_pre_hook(lambda mod, args, key=f"{name}.{i}": calls.update([key]))
    return calls


def _scores(results):
    return torch.stack([torch.as_tensor(r["pred_scores"]) for r in results])


def test_inferencer_runs_no_exit_and_matches_the_plain_model(files):
    tmp, images = files
    gc.collect()
    assert not exit_scores_requested()
    sd = ImageClassificationInferencer(_config(tmp / "sd.py", "SelfDistillClassifier"), str(tmp / "sd.pth"), "cpu")
    calls = _count_exit_calls(sd.model)
    got = sd(images, batch_size=3)
    assert sum(calls.values()) == 0
    plain = ImageClassificationInferencer(_config(tmp / "plain.py", "ImageClassifier"), str(tmp / "plain.pth"), "cpu")
    want = plain(images, batch_size=3)
    assert [r["pred_label"] for r in got] == [r["pred_label"] for r in want]
    assert torch.equal(_scores(got), _scores(want))


def test_exit_scores_only_while_a_metric_reads_them(files):
    tmp, images = files
    gc.collect()
    model = MODELS.build(dict(type="SelfDistillClassifier", **MODEL)).eval()
    calls = _count_exit_calls(model)
    batch = dict(inputs=[torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images[:2]])
    out = model.test_step(batch)
    assert "exit_scores" not in out[0] and sum(calls.values()) == 0
    metric = MultiExitAccuracy()
    out = model.test_step(batch)
    assert out[0].exit_scores.shape == (4, 4)
    assert calls == Counter({f"{n}.{i}": 1 for n in ("exit_necks", "exit_heads") for i in range(3)})
    del metric
    gc.collect()
    assert "exit_scores" not in model.val_step(batch)[0]


def test_early_exit_by_config(files):
    tmp, images = files
    sd = MODELS.build(dict(type="SelfDistillClassifier", **MODEL))
    sd.load_state_dict(torch.load(tmp / "sd.pth", weights_only=True)["state_dict"])
    sd.eval()
    batch = dict(inputs=[torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images])
    x = sd.data_preprocessor(batch, False)["inputs"]
    data = collect_exit_logits(sd, [(x, torch.zeros(len(images), dtype=torch.long))])
    conf = data.logits[:-1].softmax(-1).max(-1).values
    policy = ExitPolicy([float(c.quantile(0.5)) for c in conf])
    policy.save(tmp / "policy.json")
    with torch.no_grad():
        want = EarlyExitModel(sd, policy).eval()(x)
    assert len(set(want.exit.tolist())) > 1  # a mixed batch: several exits answer
    cfg = _config(tmp / "ee.py", "SelfDistillClassifier", early_exit=dict(policy=str(tmp / "policy.json")))
    ee = ImageClassificationInferencer(cfg, str(tmp / "sd.pth"), "cpu")
    got = ee(images, batch_size=len(images))
    torch.testing.assert_close(_scores(got), want.logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_early_exit_option_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        MODELS.build(dict(type="SelfDistillClassifier", **MODEL, early_exit=dict(policy=str(tmp_path / "no.json"))))
    with pytest.raises(ValueError, match="3 exits"):
        MODELS.build(dict(type="SelfDistillClassifier", **MODEL, early_exit=dict(thresholds=[0.5])))
    with pytest.raises(ValueError, match="either policy"):
        MODELS.build(dict(type="SelfDistillClassifier", **MODEL, early_exit=dict(threshold=0.5)))
    with pytest.raises(TypeError, match="must be a dict"):
        MODELS.build(dict(type="SelfDistillClassifier", **MODEL, early_exit="policy.json"))
