"""The timm route of the benchmark: a timm ResNet-18, ``sd_plugin.wrap``, ``SelfDistillLoss``, timm's optim/scheduler
(per-update cosine with warm-up), as a timm user writes it; per-exit top-1 from ``collect_exit_logits``."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from sd_plugin.cli._data import _Listed
from sd_plugin.core.ensemble import ensemble_logits
from tools.bench.arms import MIX_ALPHA, parse_arm
from tools.bench.cost import TrainArm
from tools.bench.data import DataSplits

NUM_CLASSES = 10  # CIFAR-10

MODEL_DESCRIPTION = "timm ResNet-18 (stage widths {width}..8x{width})"
_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 RGB statistics
_STD = (0.2470, 0.2435, 0.2616)
_LR, _MOMENTUM, _WD = 0.1, 0.9, 5e-4


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
    """Picklable description of one arm (see ``tools.bench.mmpretrain_route.arm_spec`` for the arguments)."""
    recipe = parse_arm(arm)
    if recipe.pskd or recipe.class_pairs:
        raise ValueError(
            f"arm {arm!r}: PS-KD and CS-KD need sample indices / a class-pair sampler, which the benchmark's timm "
            "route does not have; use --route mmpretrain, or `sd-plugin train-timm --pskd / --cs-kd`."
        )
    return {
        "arm": recipe.name,
        "recipe": recipe,
        "splits": splits,
        "epochs": epochs,
        "seed": seed,
        "work_dir": str(work_dir),
        "width": width or 16,
        "num_workers": num_workers,
        "batch_size": batch_size or 128,
        "options": {**recipe.options, **(sd_options or {})},
    }


def _loader(spec: Dict[str, Any], split: str, shuffle: bool, num_workers: Optional[int] = None) -> DataLoader:
    from torchvision import transforms as T

    ops: List[Any] = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if split == "train" else []
    transform = T.Compose([*ops, T.ToTensor(), T.Normalize(_MEAN, _STD)])
    splits = spec["splits"]
    ann = {"train": splits.train_ann, "val": splits.val_ann, "test": splits.test_ann}[split]
    dataset = _Listed(str(splits.root / ("train" if split == "train" else "test")), str(ann), transform)
    workers = spec["num_workers"] if num_workers is None else num_workers
    g = torch.Generator().manual_seed(spec["seed"])
    kw = dict(num_workers=workers, persistent_workers=workers > 0, generator=g)
    return DataLoader(dataset, batch_size=spec["batch_size"] if split == "train" else 256, shuffle=shuffle, **kw)


class _Trainer:
    """Model, optimiser and criterion of an arm; ``step`` is one optimisation step."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        import timm
        from timm.optim import create_optimizer_v2

        import sd_plugin

        torch.manual_seed(spec["seed"])
        w, recipe = spec["width"], spec["recipe"]
        model = timm.create_model("resnet18", num_classes=NUM_CLASSES, channels=(w, 2 * w, 4 * w, 8 * w), stem_width=w)
        self.model = (
            sd_plugin.wrap(model, input_size=(3, 32, 32), **spec["options"]) if recipe.self_distill_model else model
        )
        self.optimizer = create_optimizer_v2(self.model, opt="sgd", lr=_LR, weight_decay=_WD, momentum=_MOMENTUM)
        self.mix: Any = None
        smoothing = recipe.label_smoothing
        if recipe.batch_augment:
            from timm.data import Mixup

            # timm's own batch augment: mixes images and makes the (smoothed) soft targets itself.
            alpha = {"mixup_alpha": MIX_ALPHA} if recipe.batch_augment == "mixup" else {"cutmix_alpha": MIX_ALPHA}
            self.mix = Mixup(**alpha, label_smoothing=smoothing, num_classes=NUM_CLASSES)
            smoothing = 0.0
        self.criterion: nn.Module = (
            sd_plugin.SelfDistillLoss(label_smoothing=smoothing, **spec["options"])
            if recipe.self_distill_model
            else nn.CrossEntropyLoss(label_smoothing=smoothing)  # takes soft (mixed) targets as probabilities
        )

    def step(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> float:
        x, y = batch
        if self.mix is not None:
            x, y = self.mix(x, y)
        loss = self.criterion(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader) -> Dict[str, float]:
    from sd_plugin.deploy.calibrate import collect_exit_logits

    model.eval()
    if not getattr(model, "num_exits", 0):  # the plain timm model, or a wrapped one without exits (eval: plain logits)
        right = [(int((model(x).argmax(dim=1) == y).sum()), y.numel()) for x, y in loader]
        return {"accuracy/top1": 100.0 * sum(r for r, _ in right) / sum(n for _, n in right)}
    data = collect_exit_logits(model, loader)
    out = {f"{name}/top1": v for name, v in zip(data.names, data.top1().tolist())}
    ensemble = ensemble_logits(data.logits)  # the library's: BYOT's equal-weight mean of logits
    return {**out, "ensemble/top1": float((ensemble.argmax(dim=1) == data.targets).float().mean() * 100)}


def train_run(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train one arm; per-epoch validation and final test top-1 (per exit for the sd arm), wall time."""
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed

    random_seed(spec["seed"])
    trainer = _Trainer(spec)
    train_loader = _loader(spec, "train", shuffle=True)
    val_loader = _loader(spec, "val", shuffle=False)
    epochs = spec["epochs"]
    # Per-update cosine decay after one warm-up epoch from lr / 10 (none in a one-epoch run).
    per_epoch, warmup = len(train_loader), 1 if epochs > 1 else 0
    schedule = dict(sched="cosine", num_epochs=epochs, warmup_epochs=warmup, warmup_lr=_LR * 0.1, min_lr=0.0)
    scheduler, _ = create_scheduler_v2(trainer.optimizer, step_on_epochs=False, updates_per_epoch=per_epoch, **schedule)
    history: List[Dict[str, float]] = []
    updates = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        trainer.model.train()
        for batch in train_loader:
            trainer.step(batch)
            updates += 1
            scheduler.step_update(num_updates=updates)
        scheduler.step(epoch + 1)
        history.append({"epoch": epoch + 1, **_evaluate(trainer.model, val_loader)})
    wall = time.perf_counter() - start
    test = _evaluate(trainer.model, _loader(spec, "test", shuffle=False))
    return {"history": history, "test": test, "train_wall_s": wall}


def build_arm(spec: Dict[str, Any], arm: str) -> TrainArm:
    """The arm's model with its timm optimiser; ``infer`` is the eval-mode forward (deepest logits)."""
    trainer = _Trainer(spec)

    def infer(batch: Tuple[torch.Tensor, torch.Tensor]) -> None:
        trainer.model(batch[0])

    return TrainArm(name=arm, model=trainer.model, step=trainer.step, infer=infer)


def sample_batches(spec: Dict[str, Any], num: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first ``num`` training batches (seeded shuffle and augmentation)."""
    torch.manual_seed(spec["seed"])
    return list(itertools.islice(_loader(spec, "train", shuffle=True, num_workers=0), num))
