"""Labelled images for the subcommands: an ImageFolder split (optionally listed by an annotation file) or an
MMPretrain config's own data set, as (inputs, labels) batches on the model's device; progress bars."""

from __future__ import annotations

import argparse
import copy
import os.path as osp
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch

from ._load import Loaded

__all__ = ["DataSpec", "add_data_args", "data_spec", "batches", "keep_images", "progress"]

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_SAMPLES = 2000


@dataclass
class DataSpec:
    """Which labelled images to run: an ImageFolder split (optionally listed by ``ann``) or a config's split."""

    root: Optional[str] = None
    split: Optional[str] = None
    ann: Optional[str] = None
    mm_split: Optional[str] = None
    max_samples: int = DEFAULT_MAX_SAMPLES
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = 0
    seed: int = 0

    def describe(self) -> str:
        if self.mm_split:
            return f"the config's {self.mm_split} set"
        where = f"{self.root}/{self.split}"
        return where + (f" listed in {self.ann}" if self.ann else "")


def add_data_args(p: argparse.ArgumentParser, split: str, what: str) -> None:
    """Labelled images: an ImageFolder split (``--data``, ``--split``, ``--ann``) or the config's (``--mm-split``)."""
    g = p.add_argument_group(f"data ({what})")
    g.add_argument("--data", help="ImageFolder root: one sub-folder per split, one folder per class in each")
    g.add_argument("--split", default=split, help=f"split folder under --data (default: {split})")
    g.add_argument("--ann", help="annotation file ('relative/path.jpg label' per line) listing the split's images")
    g.add_argument("--mm-split", choices=("val", "test"), help="MMPretrain: the config's own data set instead")
    g.add_argument(
        "--max-samples", type=int, default=DEFAULT_MAX_SAMPLES, help="images used, a seeded shuffle (0: all)"
    )
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--seed", type=int, default=0, help="seed of the image sample")


def data_spec(args: argparse.Namespace) -> DataSpec:
    """The :class:`DataSpec` of :func:`add_data_args`'s options; a ValueError when they name no images."""
    if args.mm_split and args.data:
        raise ValueError("give either --data (an ImageFolder) or --mm-split (the config's data), not both.")
    if not args.mm_split and not args.data:
        raise ValueError("give the labelled images: --data ROOT (an ImageFolder root) or, with --config, --mm-split.")
    for name in ("max_samples", "workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    return DataSpec(
        root=args.data,
        split=args.split,
        ann=args.ann,
        mm_split=args.mm_split,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
    )


def progress(items: Iterable[Any], desc: str, enabled: bool = True, total: Optional[int] = None) -> Iterable[Any]:
    """``items`` with a tqdm bar on stderr when tqdm is installed (timm brings it) and ``enabled``."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)


class _Listed(torch.utils.data.Dataset):
    """Images of an annotation file ('relative/path.jpg label' per line) under ``folder``."""

    def __init__(self, folder: str, ann: str, transform: Callable[[Any], torch.Tensor]) -> None:
        self.items: List[Tuple[str, int]] = []
        for number, line in enumerate(Path(ann).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{ann}:{number}: expected 'relative/path.jpg label', got {line!r}.")
            self.items.append((osp.join(folder, parts[0]), int(parts[1])))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


@dataclass
class _Batches:
    """Sized iterable of (inputs, labels) on the model's device."""

    loader: Any
    convert: Callable[[Any], Tuple[torch.Tensor, torch.Tensor]]
    size: int = field(default=0)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for item in self.loader:
            yield self.convert(item)


def batches(loaded: Loaded, spec: DataSpec) -> _Batches:
    """The labelled images of ``spec`` as model inputs, in batches."""
    from torch.utils.data import DataLoader

    if spec.mm_split:
        return _mm_batches(loaded, spec)
    if not spec.root or not spec.split:
        raise ValueError("give the labelled images: --data ROOT (an ImageFolder root) and a split folder in it.")
    folder = osp.join(osp.expanduser(spec.root), spec.split)
    if not osp.isdir(folder):
        raise ValueError(f"no folder {folder!r}: --data needs one sub-folder per split (e.g. train/ and test/).")
    if spec.ann:
        ds: Any = _Listed(folder, spec.ann, loaded.image_transform)
    else:
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(folder, loaded.image_transform)
    loader = DataLoader(_sample(ds, spec), batch_size=spec.batch_size, num_workers=spec.workers)
    return _Batches(loader, lambda b: (loaded.to_inputs(b[0]), b[1]), len(loader))


def _sample(ds: Any, spec: DataSpec) -> Any:
    """``spec.max_samples`` images of ``ds`` in a seeded random order (all of them for 0): every class drawn."""
    from torch.utils.data import Subset

    if len(ds) == 0:
        raise ValueError(f"{spec.describe()} holds no images.")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(spec.seed))
    if spec.max_samples > 0:
        order = order[: spec.max_samples]
    return Subset(ds, order.tolist())


def _mm_batches(loaded: Loaded, spec: DataSpec) -> _Batches:
    if loaded.mm_cfg is None:
        raise ValueError("--mm-split reads an MMPretrain config's data: give --config (or --data for images).")
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmpretrain.registry import DATASETS

    key = f"{spec.mm_split}_dataloader"
    if not loaded.mm_cfg.get(key):
        raise ValueError(f"{loaded.name} has no {key}: choose a split the config defines, or give --data.")
    init_default_scope("mmpretrain")
    cfg = copy.deepcopy(loaded.mm_cfg[key])
    dataset = _sample(DATASETS.build(cfg.pop("dataset")), spec)
    cfg.update(dataset=dataset, batch_size=spec.batch_size, num_workers=spec.workers, persistent_workers=False)
    loader = Runner.build_dataloader(cfg, seed=spec.seed)
    model = loaded.model

    def convert(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        data = model.data_preprocessor(batch, False)  # type: ignore[operator]
        labels = torch.cat([s.gt_label.reshape(-1)[:1] for s in data["data_samples"]])
        return data["inputs"], labels

    return _Batches(loader, convert, len(loader))


def keep_images(
    items: Iterable[Tuple[torch.Tensor, torch.Tensor]], store: List[torch.Tensor], limit: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Pass ``items`` on, keeping up to ``limit`` of their images (on the CPU) in ``store``."""
    kept = 0
    for x, y in items:
        if kept < limit:
            store.append(x[: limit - kept].detach().cpu())
            kept += store[-1].shape[0]
        yield x, y
