"""Data set handling of the benchmark: locate CIFAR-10 (ImageFolder layout) and write fixed subsets.

Both arms of every seed read the *same* subset files, so the only difference
between the arms is self-distillation. A subset is stratified (the same number
of images per class) and drawn with its own fixed seed, independent of the
training seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["DEFAULT_DATA_ROOT", "DataSplits", "check_data_root", "write_subsets"]

DEFAULT_DATA_ROOT = Path("~/.cache/sd_plugin/cifar10").expanduser()
_ARCHIVE_HINT = (
    "Extract the JPEG archive once:\n"
    "    mkdir -p ~/.cache/sd_plugin/cifar10 && "
    "tar -xzf ../shared/data/cifar10/cifar10_jpg.tar.gz -C ~/.cache/sd_plugin/cifar10\n"
    "(the archive sits next to the repository in ../shared/data/cifar10/), or pass --data-root to a folder with "
    "train/<class>/*.jpg and test/<class>/*.jpg."
)
_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class DataSplits:
    """Annotation files (``relative/path.jpg label`` per line) of the train and test subsets.

    Attributes:
        root: The data root (holds ``train/`` and ``test/``).
        classes: Class names, label ``i`` is ``classes[i]``.
        train_ann: Annotation file of the train subset, paths relative to ``root/train``.
        val_ann: Annotation file of the per-epoch validation subset (a fixed part of the test split, for the
            training curves only; nothing is selected on it), paths relative to ``root/test``.
        test_ann: Annotation file of the test subset (the reported top-1), paths relative to ``root/test``.
        num_train: Images in the train subset.
        num_val: Images in the validation subset.
        num_test: Images in the test subset.
    """

    root: Path
    classes: Tuple[str, ...]
    train_ann: Path
    val_ann: Path
    test_ann: Path
    num_train: int
    num_val: int
    num_test: int

    def read(self, subset: str) -> List[Tuple[Path, int]]:
        """``(absolute image path, label)`` of every image of ``subset`` ('train', 'val' or 'test')."""
        anns = {"train": self.train_ann, "val": self.val_ann, "test": self.test_ann}
        if subset not in anns:
            raise ValueError(f"subset must be one of {sorted(anns)}, got {subset!r}.")
        folder = self.root / ("train" if subset == "train" else "test")
        out = []
        for line in anns[subset].read_text().splitlines():
            rel, label = line.rsplit(" ", 1)
            out.append((folder / rel, int(label)))
        return out


def _list_split(root: Path, split: str) -> Dict[str, List[str]]:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 {split} folder not found at {folder}.\n{_ARCHIVE_HINT}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders (expected {split}/<class>/*.jpg).\n{_ARCHIVE_HINT}")
    return {c: sorted(f.name for f in (folder / c).iterdir() if f.suffix.lower() in _EXTENSIONS) for c in classes}


def check_data_root(root: Path) -> Tuple[str, ...]:
    """Class names of the data set at ``root``; raises with extraction instructions if it is missing."""
    train = _list_split(root, "train")
    test = _list_split(root, "test")
    if sorted(train) != sorted(test):
        raise ValueError(f"train and test of {root} have different class folders: {sorted(train)} vs {sorted(test)}.")
    return tuple(sorted(train))


def _stratified(files: Dict[str, List[str]], total: Optional[int], rng: random.Random) -> List[Tuple[str, int]]:
    classes = sorted(files)
    available = sum(len(v) for v in files.values())
    if total is None or total >= available:
        picked = {c: files[c] for c in classes}
    else:
        if total < len(classes):
            raise ValueError(f"a subset of {total} images cannot hold all {len(classes)} classes; ask for more.")
        per_class, extra = divmod(total, len(classes))
        picked = {}
        for i, c in enumerate(classes):
            want = per_class + (1 if i < extra else 0)
            if want > len(files[c]):
                raise ValueError(f"class {c!r} has {len(files[c])} images, the subset needs {want}.")
            picked[c] = sorted(rng.sample(files[c], want))
    return [(f"{c}/{name}", label) for label, c in enumerate(classes) for name in picked[c]]


def write_subsets(
    root: Path,
    out_dir: Path,
    num_train: Optional[int],
    num_test: Optional[int],
    num_val: Optional[int] = None,
    subset_seed: int = 0,
    num_calib: int = 0,
) -> DataSplits:
    """Write stratified train/val/test annotation files under ``out_dir`` (``None``: the whole split).

    Args:
        root: Data root with ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.
        out_dir: Where the annotation files go.
        num_train: Size of the train subset, or None for all of it.
        num_test: Size of the test subset (reported top-1), or None for all of it.
        num_val: Size of the per-epoch validation subset, drawn from the test subset (None: the test subset).
        subset_seed: Seed of the draw (kept apart from the training seed).
        num_calib: Also write ``calib_subset.txt``: a stratified draw of this many training images *not* in the
            train subset (held out, for early-exit calibration and the calibrated ensemble: ``sd-plugin report
            --calib-split train --calib-ann``); drawn last, so the other subsets do not depend on it.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test), ("num_val", num_val)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None (whole split), got {value!r}.")
    classes = check_data_root(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(subset_seed)
    paths = {}
    sizes = {}
    rows = {
        split: _stratified(_list_split(root, split), total, rng)
        for split, total in (("train", num_train), ("test", num_test))
    }
    # The validation subset: a stratified part of the test subset (same draw for every run).
    test_files: Dict[str, List[str]] = {c: [] for c in classes}
    for rel, _ in rows["test"]:
        c, name = rel.split("/", 1)
        test_files[c].append(name)
    rows["val"] = _stratified(test_files, num_val, rng)
    if num_calib:
        used = {rel for rel, _ in rows["train"]}
        held: Dict[str, List[str]] = {c: [] for c in classes}
        for c, names in _list_split(root, "train").items():
            held[c] = [n for n in names if f"{c}/{n}" not in used]
        if (
            sum(len(v) for v in held.values()) >= num_calib
            and min(len(v) for v in held.values()) * len(held) >= num_calib
        ):
            rows["calib"] = _stratified(held, num_calib, rng)
    for subset, items in rows.items():
        path = out_dir / f"{subset}_subset.txt"
        path.write_text("".join(f"{rel} {label}\n" for rel, label in items))
        paths[subset] = path
        sizes[subset] = len(items)
    return DataSplits(
        root=root,
        classes=classes,
        train_ann=paths["train"],
        val_ann=paths["val"],
        test_ann=paths["test"],
        num_train=sizes["train"],
        num_val=sizes["val"],
        num_test=sizes["test"],
    )
