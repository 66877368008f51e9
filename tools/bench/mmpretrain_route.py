"""The MMPretrain route of the benchmark: configs in ``configs/benchmark/``, mmengine's Runner, ``MultiExitAccuracy``.

Each training run (arm x seed) runs in its own spawned process through
``Runner.from_cfg(cfg).train()``; a hook collects the validation metrics of
every epoch. The cost measurement builds both arms' models and optimiser
wrappers from the same configs and drives ``model.train_step`` (the call the
Runner makes) and the preprocessor plus ``model(..., mode='predict')``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from tools.bench.arms import MIX_ALPHA, parse_arm
from tools.bench.cost import TrainArm
from tools.bench.data import DataSplits

__all__ = ["CONFIG_DIR", "arm_spec", "load_config", "train_run", "build_arm", "sample_batches", "flops_inputs"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "benchmark"
MODEL_DESCRIPTION = "MMPretrain ResNet_CIFAR-18 (base width {width})"
ARM_CONFIGS = {
    "plain": "resnet18-w16_1xb128_cifar10-subset_plain.py",
    "sd": "resnet18-w16_1xb128_cifar10-subset_sd.py",
}


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
    """Picklable description of one arm: its config file and the overrides the benchmark applies.

    Args:
        arm: An arm name (``tools.bench.arms``: ce, ls, byot, byot+ls, pskd, cskd, tfkd, ...).
        splits: Data subsets (both arms get the same).
        epochs: Training epochs.
        seed: Training seed (model init, data order, augmentation).
        work_dir: The Runner's work directory.
        width: Base channels of ResNet_CIFAR (None: the config's).
        num_workers: Data loader workers (0: load in the main process).
        batch_size: Training batch size (None: the config's).
        sd_options: Self-distillation options (``SelfDistillConfig`` fields) for every arm with a
            self-distillation model (after the arm's own).
    """
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
        for key, value in {**recipe.options, **(sd_options or {})}.items():
            over[f"model.{key}"] = value
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
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


class _EpochMetrics:
    """Collects the validation metrics of every epoch (registered on the Runner at the lowest priority)."""

    priority = "LOWEST"

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.history: List[Dict[str, float]] = []

    def make_hook(self) -> Any:
        from mmengine.hooks import Hook

        history, tag = self.history, self.tag

        class EpochMetricsHook(Hook):
            def after_val_epoch(self, runner: Any, metrics: Optional[Dict[str, float]] = None) -> None:
                if metrics:
                    history.append({"epoch": runner.epoch, **{k: float(v) for k, v in metrics.items()}})
                    print(f"[benchmark] {tag} epoch {runner.epoch}: {history[-1]}", flush=True)

        return EpochMetricsHook()


def train_run(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train one arm with mmengine's Runner; per-epoch validation metrics, final test metrics, wall time.

    Meant to run in a fresh (spawned) process: the Runner, its registries and
    the logger stay out of the parent.
    """
    from mmengine.runner import Runner

    import sd_plugin  # noqa: F401  (registers the MMPretrain components, safe globals)

    cfg = load_config(spec)
    runner = Runner.from_cfg(cfg)
    collector = _EpochMetrics(Path(spec["overrides"]["work_dir"]).name)
    runner.register_hook(collector.make_hook(), priority=_EpochMetrics.priority)
    start = time.perf_counter()
    runner.train()
    wall = time.perf_counter() - start
    test = {k: float(v) for k, v in runner.test().items()}
    return {"history": collector.history, "test": test, "train_wall_s": wall}


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
    loader_cfg = cfg.train_dataloader.copy()
    loader_cfg["num_workers"] = 0
    loader_cfg["persistent_workers"] = False
    loader = Runner.build_dataloader(loader_cfg, seed=cfg.randomness.seed)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == num:
            break
    return out


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

    return TrainArm(name=arm, model=model, step=step, infer=infer, optimizer=optim_wrapper)


def flops_inputs(arm: TrainArm, batch: Any) -> Any:
    """The preprocessed input tensor of a batch (what the backbone sees)."""
    model: Any = arm.model
    return model.data_preprocessor(batch, False)["inputs"]


def plain_forward(arm: TrainArm) -> Any:
    """Plain model's logits from preprocessed inputs."""

    def fwd(x: Any) -> Any:
        return arm.model(x, mode="tensor")

    return fwd
