"""Test helpers for the reliability tests: tiny data sets, tiny mmengine configs, a probe hook.

Imported by the tests and, through ``custom_imports``, by training subprocesses
(``PYTHONPATH`` holds this folder there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.registry import DATA_SAMPLERS, HOOKS, METRICS
from PIL import Image
from torch.utils.data import Sampler

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def make_image_folder(root: Path, num_classes: int = 2, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder-layout data set of random but class-dependent PNG images."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 80, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def tiny_resnet(num_classes: int = 2) -> Dict[str, Any]:
    """A plain MMPretrain ImageClassifier config: ResNet-18 layout with 8 base channels (64-d features)."""
    return dict(
        type="ImageClassifier",
        backbone=dict(type="ResNet", depth=18, stem_channels=8, base_channels=8, out_indices=(3,)),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=num_classes, in_channels=64, loss=dict(type="CrossEntropyLoss")),
    )


def sd_resnet(num_classes: int = 2, **options: Any) -> Dict[str, Any]:
    """The same classifier with self-distillation exits (``SelfDistillClassifier``)."""
    return dict(tiny_resnet(num_classes), type="SelfDistillClassifier", probe_size=32, **options)


def mm_config(
    data_root: Path,
    work_dir: Path,
    model: Optional[Dict[str, Any]] = None,
    max_iters: int = 4,
    batch_size: int = 2,
    checkpoint_interval: int = 2,
    sampler: Optional[Dict[str, Any]] = None,
    accumulative_counts: int = 1,
    num_classes: int = 2,
    crash_after: Optional[int] = None,
) -> Dict[str, Any]:
    """A complete, deterministic, iteration-based mmengine config (no random augmentation, no validation)."""
    return dict(
        default_scope="mmpretrain",
        custom_imports=dict(imports=["sd_plugin", "_rel_helpers"], allow_failed_imports=False),
        work_dir=str(work_dir),
        model=dict(
            **(model or tiny_resnet(num_classes)),
            data_preprocessor=dict(
                num_classes=num_classes, mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7], to_rgb=True
            ),
        ),
        train_dataloader=dict(
            batch_size=batch_size,
            num_workers=0,
            persistent_workers=False,
            dataset=dict(
                type="CustomDataset",
                data_root=str(data_root),
                pipeline=[dict(type="LoadImageFromFile"), dict(type="PackInputs")],
            ),
            sampler=sampler or dict(type="DefaultSampler", shuffle=False),
        ),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=10**6),
        optim_wrapper=dict(
            optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=1e-4),
            accumulative_counts=accumulative_counts,
        ),
        param_scheduler=[dict(type="MultiStepLR", by_epoch=False, milestones=[3], gamma=0.1)],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=1),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", interval=checkpoint_interval, by_epoch=False),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        custom_hooks=[dict(type="ProbeHook")] + ([dict(type="CrashHook", after=crash_after)] if crash_after else []),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0)),
        randomness=dict(seed=0, deterministic=True),
        log_level="INFO",
    )


def write_config(cfg: Dict[str, Any], path: Path) -> Path:
    from mmengine.config import Config

    Config(cfg).dump(str(path))
    return path


def subprocess_env() -> Dict[str, str]:
    """Environment for training subprocesses: this folder importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


@HOOKS.register_module()
class ProbeHook(Hook):
    """Records, per rank, every iteration's losses and the final parameters (in the work dir)."""

    priority = "VERY_LOW"

    def before_train(self, runner: Any) -> None:
        self.records: List[Dict[str, Any]] = []
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        self._dtypes: List[str] = []
        head = getattr(model, "head", None)
        fc = getattr(head, "fc", None)
        if fc is not None:
            fc.register_forward_hook(lambda m, a, out: self._dtypes.append(str(out.dtype)))

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        scalars = {
            k: float(v.detach()) for k, v in (outputs or {}).items() if isinstance(v, torch.Tensor) and v.numel() == 1
        }
        scalars["iter"] = runner.iter
        scalars["lr"] = runner.optim_wrapper.get_lr()["lr"][0]
        self.records.append(scalars)

    def after_train(self, runner: Any) -> None:
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        rank = get_rank()
        out = Path(runner.work_dir)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.save(params, out / f"probe_params_rank{rank}.pt")
        state = runner.optim_wrapper.state_dict()
        torch.save(state, out / f"probe_optim_rank{rank}.pt")
        info = dict(
            records=self.records,
            head_dtypes=sorted(set(self._dtypes)),
            wrapper=type(runner.model).__name__,
            optim_wrapper=type(runner.optim_wrapper).__name__,
        )
        (out / f"probe_rank{rank}.json").write_text(json.dumps(info))


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashHook`."""


@HOOKS.register_module()
class CrashHook(Hook):
    """Kills training right after iteration ``after`` (or epoch ``after_epoch``), after the checkpoint hook ran."""

    priority = "LOWEST"

    def __init__(self, after: int = 0, after_epoch: int = 0) -> None:
        self.after = after
        self.after_epoch = after_epoch

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if runner.iter + 1 == self.after:
            raise SimulatedCrash(f"simulated crash after iteration {self.after}")

    def after_train_epoch(self, runner: Any) -> None:
        if runner.epoch + 1 == self.after_epoch:
            raise SimulatedCrash(f"simulated crash after epoch {self.after_epoch}")


def augmented_epoch_config(
    data_root: Path,
    work_dir: Path,
    model: Dict[str, Any],
    max_epochs: int = 2,
    num_workers: int = 2,
    crash_after_epoch: int = 0,
    batch_size: int = 4,
) -> Dict[str, Any]:
    """Epoch-based training as users run it: shuffled sampler, RandomCrop + RandomFlip, workers, validation.

    Persistent workers are left to ``sd-plugin train`` (MMPretrain's rule: on when ``num_workers > 0``).
    """
    cfg = mm_config(data_root, work_dir, model=model, batch_size=batch_size)
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="RandomCrop", crop_size=32, padding=4),
        dict(type="RandomFlip", prob=0.5, direction="horizontal"),
        dict(type="PackInputs"),
    ]
    loader = cfg["train_dataloader"]
    del loader["persistent_workers"]
    loader.update(num_workers=num_workers, sampler=dict(type="DefaultSampler", shuffle=True))
    loader["dataset"]["pipeline"] = pipeline
    val = dict(loader, sampler=dict(type="DefaultSampler", shuffle=False))
    val["dataset"] = dict(loader["dataset"], pipeline=[dict(type="LoadImageFromFile"), dict(type="PackInputs")])
    cfg.update(
        train_dataloader=loader,
        val_dataloader=val,
        val_evaluator=dict(type="Accuracy"),
        val_cfg=dict(),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=1),
        param_scheduler=[dict(type="MultiStepLR", by_epoch=True, milestones=[max_epochs - 1], gamma=0.1)],
    )
    cfg["default_hooks"]["checkpoint"] = dict(type="CheckpointHook", interval=1, by_epoch=True)
    if crash_after_epoch:
        cfg["custom_hooks"] = cfg["custom_hooks"] + [dict(type="CrashHook", after_epoch=crash_after_epoch)]
    return cfg


@DATA_SAMPLERS.register_module()
class InterleavedSampler(Sampler):
    """Single-process order that matches ``DefaultSampler(shuffle=False)`` split over ``world_size`` ranks.

    With per-rank batch size b, DDP step k sees on rank r the indices ``r, r + W, ...`` of the block
    ``[k*W*b, (k+1)*W*b)``; this sampler yields rank 0's batch, then rank 1's, ... for each step, so a
    single process with ``accumulative_counts=W`` sees the very same mini-batches.
    """

    def __init__(self, dataset: Any, world_size: int = 2, batch_size: int = 2, seed: Optional[int] = None) -> None:
        self.n = len(dataset)
        self.world_size = world_size
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        block = self.world_size * self.batch_size
        order: List[int] = []
        for start in range(0, self.n - self.n % block, block):
            for r in range(self.world_size):
                order.extend(range(start + r, start + block, self.world_size))
        return iter(order)

    def __len__(self) -> int:
        return self.n - self.n % (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        pass


def stall_on_next_big_write(limit_bytes: int, marker: Path) -> None:
    """Make the next write past ``limit_bytes`` in any file stop the process half-way, for a test to SIGKILL it.

    ``RLIMIT_FSIZE`` makes the kernel refuse the write that crosses the limit (the file keeps its first
    ``limit_bytes`` bytes) and send SIGXFSZ; the handler creates ``marker`` and sleeps, so the process sits in
    the middle of its save until the test kills it with SIGKILL. Independent of how the writer writes.
    """
    import resource
    import signal
    import time

    def stall(signum: int, frame: Any) -> None:
        marker.touch()
        time.sleep(600)

    signal.signal(signal.SIGXFSZ, stall)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@HOOKS.register_module()
class StallDuringSaveHook(Hook):
    """At the checkpoint after iteration ``at_iter``, stall the save half-way (see :func:`stall_on_next_big_write`)."""

    def __init__(self, at_iter: int, marker: str) -> None:
        self.at_iter = at_iter
        self.marker = Path(marker)

    def before_save_checkpoint(self, runner: Any, checkpoint: Dict[str, Any]) -> None:
        if runner.iter + 1 == self.at_iter:  # the CheckpointHook saves before the counter moves on
            previous = max(Path(runner.work_dir).glob("iter_*.pth"), key=lambda p: p.stat().st_mtime_ns)
            stall_on_next_big_write(previous.stat().st_size // 2, self.marker)


@METRICS.register_module()
class CallCountMetric(BaseMetric):
    """``count``: 1 at the first evaluation, 2 at the second, ...: a new best at every validation."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def process(self, data_batch: Any, data_samples: Any) -> None:
        self.results.append(1)

    def compute_metrics(self, results: List[Any]) -> Dict[str, float]:
        self.calls += 1
        return dict(count=float(self.calls))


ERRORS_MD = REPO / "docs" / "errors.md"


def documented_messages(row: str) -> List[str]:
    """The messages docs/errors.md shows for ``row`` ("what you see" column), without the "(before: ...)" ones."""
    import re

    for line in ERRORS_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == row:
            seen = re.sub(r"\(before:[^`]*`[^`]*`\)", "", cells[-2])
            return [m for m in re.findall(r"`([^`]+)`", seen) if re.match(r"(\w+: |\.\.\.)", m)]
    raise AssertionError(f"docs/errors.md has no row {row}")


def _doc_pattern(message: str) -> Any:
    """``...`` stands for any text; a number for any number (the docs show one example value); any whitespace."""
    import re

    def literal(text: str) -> str:
        pieces = re.split(r"(-?\d+(?:\.\d+)?|nan|inf)", text)
        out = [r"(-?\d+(?:\.\d+)?|nan|inf)" if i % 2 else re.escape(p) for i, p in enumerate(pieces)]
        return re.sub(r"(\\ )+", r"\\s+", "".join(out))

    return re.compile(".*".join(literal(part) for part in re.split(r"\s*\.\.\.\s*", message)), re.DOTALL)


class _Documented:
    def __init__(self, row: str, info: Any) -> None:
        self.row, self.info = row, info

    def __enter__(self) -> Any:
        self.excinfo = self.info.__enter__()
        return self.excinfo

    def __exit__(self, *exc: Any) -> bool:
        handled = self.info.__exit__(*exc)
        actual = f"{self.excinfo.type.__name__}: {self.excinfo.value}"
        documented = documented_messages(self.row)
        assert any(_doc_pattern(m).match(actual) for m in documented), (
            f"docs/errors.md row {self.row} shows {documented}, but the error is {actual!r}: update the row."
        )
        return bool(handled)


def raises_documented(row: str, exc: Any, match: Optional[str] = None) -> Any:
    """``pytest.raises(exc, match=match)`` that also checks the error against row ``row`` of docs/errors.md.

    The error, as ``"Type: message"``, must match one of the row's documented messages, where ``...`` in the
    documentation stands for any text.
    """
    import pytest

    return _Documented(row, pytest.raises(exc, match=match))
