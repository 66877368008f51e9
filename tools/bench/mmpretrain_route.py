"""The MMPretrain route of the benchmark (configs in ``configs/benchmark/``, ``MultiExitAccuracy``): every training
run is ``Runner.from_cfg(cfg).train()`` in a spawned process; the cost measurement drives the ``model.train_step`` the
Runner calls and ``model(..., mode='predict')``."""

from __future__ import annotations

import functools
import itertools
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from tools.bench.arms import MIX_ALPHA, parse_arm
from tools.bench.cost import TrainArm
from tools.bench.data import DataSplits

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "benchmark"
MODEL_DESCRIPTION = "MMPretrain ResNet_CIFAR-18 (base width {width})"
ARM_CONFIGS = {kind: f"resnet18-w16_1xb128_cifar10-subset_{kind}.py" for kind in ("plain", "sd")}


def _schedule(epochs: int) -> List[Dict[str, Any]]:
    if epochs == 1:
        return [dict(type="CosineAnnealingLR", by_epoch=True, begin=0, end=1, convert_to_iter_based=True)]
    return [
        dict(type="LinearLR", start_factor=0.1, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
        dict(type="CosineAnnealingLR", by_epoch=True, begin=1, end=epochs, convert_to_iter_based=True),
    ]


def arm_spec(
    arm: str,
    splits: DataSplits,
    epochs: int,
    seed: int,
    work_dir: Path,
    width: Optional[int] = None,
    num_workers: int = 1,
    batch_size: Optional[int] = None,
    sd_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Picklable description of one arm (``tools.bench.arms``): its config file and the overrides the benchmark
    applies. ``seed``: model init, data order and augmentation; ``width`` (base channels) and ``batch_size``: None keeps
    the config's; ``sd_options``: ``SelfDistillConfig`` options of every arm with exits, over the arm's own."""
    recipe = parse_arm(arm)
    over: Dict[str, Any] = {
        "work_dir": str(work_dir),
        "randomness.seed": seed,
        "train_cfg.max_epochs": epochs,
        "param_scheduler": _schedule(epochs),
        "log_level": "WARNING",
        # The last checkpoint stays in the work dir: `sd-plugin report` measures early exit on it.
        "default_hooks.checkpoint.save_last": True,
    }
    for loader, split, ann in (
        ("train_dataloader", "train", splits.train_ann),
        ("val_dataloader", "test", splits.val_ann),
        ("test_dataloader", "test", splits.test_ann),
    ):
        over[f"{loader}.dataset.data_root"] = str(splits.root)
        over[f"{loader}.dataset.data_prefix"] = split
        over[f"{loader}.dataset.ann_file"] = str(ann)
        over[f"{loader}.num_workers"] = num_workers
        over[f"{loader}.persistent_workers"] = num_workers > 0
    if batch_size is not None:
        over["train_dataloader.batch_size"] = batch_size
    if width is not None:
        over["model.backbone.stem_channels"] = width
        over["model.backbone.base_channels"] = width
        over["model.head.in_channels"] = width * 8
    if recipe.label_smoothing:
        # MMPretrain's own label smoothing on the head loss ('original': (1 - e) * y + e / K), copied to every exit.
        over["model.head.loss"] = dict(
            type="LabelSmoothLoss", label_smooth_val=recipe.label_smoothing, mode="original", loss_weight=1.0
        )
    if recipe.batch_augment:
        # MMPretrain's own batch augments (the data preprocessor mixes images and one-hot targets); the head's
        # cross-entropy takes the soft targets (use_soft), label smoothing applies on top when asked.
        kind = {"mixup": "Mixup", "cutmix": "CutMix"}[recipe.batch_augment]
        over["model.train_cfg"] = dict(augments=[dict(type=kind, alpha=MIX_ALPHA)])
        if not recipe.label_smoothing:
            over["model.head.loss"] = dict(type="CrossEntropyLoss", loss_weight=1.0, use_soft=True)
    replace: Dict[str, Any] = {}
    if recipe.self_distill_model:
        over.update({f"model.{key}": value for key, value in {**recipe.options, **(sd_options or {})}.items()})
    if recipe.class_pairs:
        replace["train_dataloader.sampler"] = dict(type="ClassPairSampler")
    if recipe.pskd:
        replace["custom_hooks"] = [dict(type="ProgressiveSelfKDHook")]
    config = ARM_CONFIGS["sd" if recipe.self_distill_model else "plain"]
    return {"config": str(CONFIG_DIR / config), "overrides": over, "replace": replace}


def load_config(spec: Dict[str, Any]) -> Any:
    """The mmengine ``Config`` of an arm spec."""
    from mmengine.config import Config

    cfg = Config.fromfile(spec["config"])
    cfg.merge_from_dict(spec["overrides"])
    for key, value in spec.get("replace", {}).items():  # whole values, not merged into the config's
        parent, _, leaf = key.rpartition(".")
        (cfg[parent] if parent else cfg)[leaf] = value
    return cfg


def _epoch_metrics_hook(history: List[Dict[str, float]], tag: str) -> Any:
    """A hook that appends the validation metrics of every epoch to ``history``."""
    from mmengine.hooks import Hook

    class EpochMetricsHook(Hook):
        def after_val_epoch(self, runner: Any, metrics: Optional[Dict[str, float]] = None) -> None:
            if metrics:
                history.append({"epoch": runner.epoch, **{k: float(v) for k, v in metrics.items()}})
                print(f"[benchmark] {tag} epoch {runner.epoch}: {history[-1]}", flush=True)

    return EpochMetricsHook()


def train_run(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train one arm with mmengine's Runner, in a fresh (spawned) process that keeps its registries and logger out of
    the parent; per-epoch validation metrics, final test metrics, wall time."""
    from mmengine.runner import Runner

    import sd_plugin  # noqa: F401  (registers the MMPretrain components, safe globals)

    runner = Runner.from_cfg(load_config(spec))
    history: List[Dict[str, float]] = []
    tag = Path(spec["overrides"]["work_dir"]).name
    runner.register_hook(_epoch_metrics_hook(history, tag), priority="LOWEST")  # after the metric hooks
    start = time.perf_counter()
    runner.train()
    wall = time.perf_counter() - start
    return {"history": history, "test": {k: float(v) for k, v in runner.test().items()}, "train_wall_s": wall}


def _init_scope() -> None:
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import sd_plugin  # noqa: F401

    init_default_scope("mmpretrain")
    MMLogger.get_instance("sd_plugin_benchmark", log_level="WARNING")  # quiet init_weights() reports


def sample_batches(spec: Dict[str, Any], num: int) -> List[Any]:
    """The first ``num`` training batches of the arm's data loader (fixed seed), as collated dicts."""
    from mmengine.runner import Runner

    _init_scope()
    cfg = load_config(spec)
    loader_cfg = dict(cfg.train_dataloader, num_workers=0, persistent_workers=False)
    return list(itertools.islice(Runner.build_dataloader(loader_cfg, seed=cfg.randomness.seed), num))


def build_arm(spec: Dict[str, Any], arm: str) -> TrainArm:
    """Model and optimiser wrapper of an arm; ``step`` is ``model.train_step``, ``infer`` a ``'predict'`` forward."""
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmpretrain.registry import MODELS

    _init_scope()
    cfg = load_config(spec)
    torch.manual_seed(cfg.randomness.seed)
    model_cfg = cfg.model.copy()
    model_cfg.setdefault("data_preprocessor", cfg.get("data_preprocessor"))
    model = MODELS.build(model_cfg)
    model.init_weights()
    loss = getattr(model, "distill_loss", None)
    if loss is not None and loss.config.pskd_alpha > 0:
        loss.set_progress(0.5)  # what ProgressiveSelfKDHook sets mid-training
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)

    def step(batch: Any) -> None:
        model.train_step(batch, optim_wrapper)

    def infer(batch: Any) -> None:
        # mode='predict' outside the Runner's val/test loop: the deepest classifier only, as deployed
        # (test_step of SelfDistillClassifier would also score every exit for MultiExitAccuracy).
        data = model.data_preprocessor(batch, False)
        model(**data, mode="predict")

    def inputs(batch: Any) -> Any:
        return model.data_preprocessor(batch, False)["inputs"]

    forward = functools.partial(model, mode="tensor")  # the deepest logits of preprocessed inputs
    return TrainArm(name=arm, model=model, step=step, infer=infer, inputs=inputs, forward=forward)
