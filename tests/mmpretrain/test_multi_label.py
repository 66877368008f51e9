"""Multi-label heads (``MultiLabelClsHead``, ``MultiLabelLinearClsHead``, ``CSRAClsHead``): a sigmoid per class.

Each case is a packaged MMPretrain config, shrunk (5 classes, ResNet-18 or
LeNet-5), built as ``ImageClassifier`` and as ``SelfDistillClassifier`` with
the same weights. The deepest loss must be bit-identical to the plain model's,
every exit must be a multi-label classifier trained with the head's own loss,
KD must be the per-class binary KL to the deepest logits, and inference must
be the plain model's (sigmoid scores, the head's threshold).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
from _mmp_helpers import (
    NUM_CLASSES,
    backward_reaches_every_exit,
    build_pair,
    load_model_cfg,
    packaged,
    predict_like_plain,
)

from sd_plugin.core import SelfDistillConfig, kd_binary_kl, kd_kl_div

pytestmark = pytest.mark.mmpretrain

VOC_VGG = "vgg/vgg16_8xb16_voc.py"


def _voc_head() -> Dict[str, Any]:
    from mmengine import Config

    return Config.fromfile(packaged(VOC_VGG)).model.head.to_dict()


# case: (packaged config, shrinking overrides, input size, exit classifier kind, SelfDistillClassifier options)
CASES: Dict[str, Tuple[str, Dict[str, Any], int, str, Dict[str, Any]]] = {
    # MultiLabelLinearClsHead with a softmax cross-entropy on Mixup's soft targets (as packaged).
    "linear_mixup": (
        "resnet/resnet50_8xb16-mixup_cifar10.py",
        {"backbone.depth": 18, "head.in_channels": 512},
        32,
        "copy",
        {},
    ),
    # CSRA classifies the unpooled map: exits get a MultiLabelLinearClsHead with CSRA's sigmoid loss.
    "csra": (
        "csra/resnet101-csra_1xb16_voc07-448px.py",
        {"backbone.depth": 18, "head.in_channels": 512},
        32,
        "linear",
        {},
    ),
    # The backbone computes the logits (as VGG does on VOC): MultiLabelClsHead, exits a Linear to the logits.
    "logits_in_backbone": ("lenet/lenet5_mnist.py", {"head": None}, 32, "logits", {"probe_size": 32}),
}

_BUILT: Dict[str, Tuple[Any, Any]] = {}


def _model_cfg(case: str) -> Dict[str, Any]:
    rel, overrides, _, _, _ = CASES[case]
    if case == "logits_in_backbone":
        cfg = load_model_cfg(rel)
        cfg["head"] = _voc_head()
        cfg["backbone"]["num_classes"] = NUM_CLASSES
        cfg["data_preprocessor"] = dict(cfg["data_preprocessor"], to_onehot=True)
        return cfg
    return load_model_cfg(rel, overrides)


def _pair(case: str) -> Tuple[Any, Any]:
    if case not in _BUILT:
        _BUILT[case] = build_pair(_model_cfg(case), **CASES[case][4])
    return _BUILT[case]


@pytest.fixture(autouse=True, scope="module")
def _free_models() -> Iterator[None]:
    yield
    _BUILT.clear()


def _batch(model: Any, size: int, n: int = 4, seed: int = 0) -> Tuple[torch.Tensor, List[Any]]:
    """Images with one to three labels each (label lists, as a multi-label data set gives them)."""
    from mmpretrain.structures import DataSample

    g = torch.Generator().manual_seed(seed)
    channels = int(model.data_preprocessor.mean.shape[0]) if model.data_preprocessor.mean is not None else 3
    imgs = [torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]
    labels = [[1], [0, 2], [1, 3, 4], [4]]
    samples = [DataSample().set_gt_label(labels[i % len(labels)]) for i in range(n)]
    data = model.data_preprocessor({"inputs": imgs, "data_samples": samples}, True)
    return data["inputs"], data["data_samples"]


def _losses(model: Any, inputs: torch.Tensor, samples: List[Any]) -> Dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return model(inputs, samples, mode="loss")


@pytest.mark.parametrize("case", list(CASES))
def test_multi_label_head_keeps_its_loss_and_exits_train(case: str) -> None:
    from mmpretrain.models.heads import MultiLabelClsHead

    sd, plain = _pair(case)
    size, kind = CASES[case][2], CASES[case][3]
    assert sd.multi_label and sd.exit_head_kind == kind and sd.num_exits >= 2
    assert all(isinstance(h, MultiLabelClsHead) for h in sd.exit_heads)
    sd.train()
    plain.train()
    inputs, samples = _batch(sd, size)
    want = _losses(plain, inputs, samples)
    got = _losses(sd, inputs, samples)
    assert got["loss_ce"].item() == want["loss"].item(), (got["loss_ce"].item(), want["loss"].item())

    # KD is the per-class binary KL of every exit to the deepest logits, not a softmax KL.
    cfg = SelfDistillConfig()
    feats, tapped = sd._tapped_forward(inputs)
    teacher = sd.head(feats)
    for k, feature in enumerate(tapped):
        student = sd.exit_heads[k](sd.exit_necks[k](feature))
        binary = cfg.kd_weight * kd_binary_kl(student, teacher, cfg.temperature)
        torch.testing.assert_close(got[f"exit{k + 1}_loss_kd"], binary, rtol=0, atol=1e-6)
        softmax_kd = cfg.kd_weight * kd_kl_div(student, teacher, cfg.temperature)
        assert abs(softmax_kd.item() - binary.item()) > 1e-4

    backward_reaches_every_exit(sd, got)
    # Inference is the plain model's: sigmoid scores, labels over the head's threshold.
    predict_like_plain(sd, plain, _batch(sd, size, n=2, seed=1)[0])


def test_predict_exit_uses_the_heads_sigmoid_and_threshold() -> None:
    from mmpretrain.registry import MODELS

    cfg = _model_cfg("linear_mixup")
    cfg["head"]["thr"] = 0.45
    sd = MODELS.build(dict(cfg, type="SelfDistillClassifier", predict_exit=1)).eval()
    inputs, _ = _batch(sd, 32, n=3)
    with torch.no_grad():
        samples = sd(inputs, mode="predict")
        feature = sd.exit_engine.run_to(0, lambda: sd.backbone(inputs))
        logits = sd.forward_exit(0, feature)
    for sample, row in zip(samples, logits):
        torch.testing.assert_close(sample.pred_score, row.sigmoid(), rtol=0, atol=1e-6)
        assert torch.equal(sample.pred_label, torch.where(row.sigmoid() >= 0.45)[0])


def test_ensemble_of_a_multi_label_model_is_the_sigmoid_of_the_mean_logits() -> None:
    from mmpretrain.registry import MODELS

    sd = MODELS.build(dict(_model_cfg("linear_mixup"), type="SelfDistillClassifier", predict_exit="ensemble")).eval()
    inputs, _ = _batch(sd, 32, n=2)
    with torch.no_grad():
        samples = sd(inputs, mode="predict")
        out = sd._forward_all(inputs)[1]
    mean_logits = torch.stack(out.all_logits()).mean(dim=0)
    torch.testing.assert_close(torch.stack([s.pred_score for s in samples]), mean_logits.sigmoid())


def test_softmax_methods_and_early_exit_are_refused_for_multi_label_heads() -> None:
    from mmpretrain.registry import MODELS

    cfg = _model_cfg("linear_mixup")
    with pytest.raises(ValueError, match="early_exit is not available for a multi-label model"):
        MODELS.build(dict(cfg, type="SelfDistillClassifier", early_exit=dict(thresholds=[0.9, 0.9, 0.9])))
    sd = MODELS.build(dict(cfg, type="SelfDistillClassifier", tfkd_weight=0.5)).train()
    inputs, samples = _batch(sd, 32)
    with pytest.raises(ValueError, match="tfkd_weight > 0.*multi-label"):
        sd(inputs, samples, mode="loss")


def test_multi_label_labels_out_of_range_are_named() -> None:
    from mmpretrain.structures import DataSample

    sd = _pair("csra")[0].train()
    inputs, _ = _batch(sd, 32, n=2)
    samples = [DataSample().set_gt_label([0, 1]), DataSample().set_gt_label([2, NUM_CLASSES])]
    with pytest.raises(ValueError, match=f"labels must lie in \\[0, {NUM_CLASSES - 1}\\]"):
        sd(inputs, samples, mode="loss")


def test_per_exit_map_through_val_step_and_accuracy_refuses_sigmoid_scores() -> None:
    import gc

    from mmengine.evaluator import Evaluator
    from mmpretrain.evaluation import AveragePrecision
    from mmpretrain.structures import DataSample

    from sd_plugin.mmpretrain_adapter import MultiExitAccuracy, MultiExitAveragePrecision

    sd = _pair("csra")[0].eval()
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(6)]
    labels = [[0], [1, 2], [3], [4, 0], [2], [1, 3, 4]]
    data = {"inputs": imgs, "data_samples": [DataSample().set_gt_label(lb) for lb in labels]}
    ours = Evaluator([AveragePrecision(), MultiExitAveragePrecision()])
    outputs = sd.val_step(data)
    assert outputs[0].exit_scores.shape == (sd.num_exits + 1, NUM_CLASSES)
    ours.process(outputs)
    metrics = ours.evaluate(len(imgs))
    assert metrics["multi-exit/deepest_mAP"] == pytest.approx(metrics["multi-label/mAP"], abs=1e-4)
    x = sd.data_preprocessor(data, False)["inputs"]
    with torch.no_grad():
        out = sd._forward_all(x)[1]
    target = torch.stack([torch.nn.functional.one_hot(torch.tensor(lb), NUM_CLASSES).sum(0) for lb in labels])
    for k in range(1, sd.num_exits + 1):
        want = float(AveragePrecision.calculate(out.exit_logits[k - 1].sigmoid(), target))
        assert metrics[f"multi-exit/exit{k}_mAP"] == pytest.approx(want, abs=1e-3)
    want = float(AveragePrecision.calculate(out.ensemble_probs(), target))
    assert metrics["multi-exit/ensemble_mAP"] == pytest.approx(want, abs=1e-3)
    del ours
    gc.collect()

    accuracy = Evaluator([MultiExitAccuracy()])
    with pytest.raises(ValueError, match="MultiExitAveragePrecision"):
        accuracy.process(sd.val_step(data))


def test_early_exit_and_calibration_refuse_a_multi_label_model_but_truncation_works() -> None:
    from sd_plugin.deploy import EarlyExitModel, collect_exit_logits, truncate

    sd = _pair("csra")[0].eval()
    with pytest.raises(ValueError, match="early exit is not available for a multi-label model"):
        EarlyExitModel(sd, [0.9] * sd.num_exits)
    x = _batch(sd, 32, n=2)[0]
    with pytest.raises(ValueError, match="exit calibration is not available for a multi-label model"):
        collect_exit_logits(sd, [(x, torch.zeros(2, dtype=torch.long))])
    with torch.no_grad():
        want = sd.forward_exit(0, sd.exit_engine.run_to(0, lambda: sd.backbone(x)))
        torch.testing.assert_close(truncate(sd, exit=1, example_input=x)(x), want)
