"""Data of the benchmark: locate CIFAR-10 (ImageFolder layout) and write fixed subsets that every arm and seed reads:
stratified (the same number of images per class), drawn with their own fixed seed, not the training seed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
    """Annotation files (``relative/path.jpg label``; label ``i`` is ``classes[i]``) and sizes of the subsets, paths
    relative to ``root/train`` or ``root/test``; ``val_ann``: part of the test subset, for the per-epoch curves only."""

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
        ann = {"train": self.train_ann, "val": self.val_ann, "test": self.test_ann}[subset]
        folder = self.root / ("train" if subset == "train" else "test")
        return [(folder / rel, int(label)) for rel, label in (ln.rsplit(" ", 1) for ln in ann.read_text().splitlines())]


def _list_split(root: Path, split: str) -> Dict[str, List[str]]:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 {split} folder not found at {folder}.\n{_ARCHIVE_HINT}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders (expected {split}/<class>/*.jpg).\n{_ARCHIVE_HINT}")
    return {c: sorted(f.name for f in (folder / c).iterdir() if f.suffix.lower() in _EXTENSIONS) for c in classes}


def _stratified(files: Dict[str, List[str]], total: Optional[int], rng: random.Random) -> List[Tuple[str, int]]:
    classes = sorted(files)
    picked = {c: files[c] for c in classes}
    if total is not None and total < sum(len(v) for v in files.values()):
        if total < len(classes):
            raise ValueError(f"a subset of {total} images cannot hold all {len(classes)} classes; ask for more.")
        per_class, extra = divmod(total, len(classes))
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
    """Write stratified train/val/test annotation files of ``root`` (``train/<class>/*.jpg``, ``test/...``) under
    ``out_dir``; a size of None takes the whole split (``num_val``: the whole test subset, which it is drawn from).
    ``num_calib`` also writes ``calib_subset.txt``: that many training images held out of the train subset (for
    ``sd-plugin report --calib-split train --calib-ann``), drawn last, so the other subsets do not depend on it."""
    for name, value in (("num_train", num_train), ("num_test", num_test), ("num_val", num_val)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None (whole split), got {value!r}.")
    train, test = _list_split(root, "train"), _list_split(root, "test")
    if sorted(train) != sorted(test):
        raise ValueError(f"train and test of {root} have different class folders: {sorted(train)} vs {sorted(test)}.")
    classes = tuple(sorted(train))
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(subset_seed)
    rows = {"train": _stratified(train, num_train, rng), "test": _stratified(test, num_test, rng)}
    # The validation subset: a stratified part of the test subset (same draw for every run).
    test_files: Dict[str, List[str]] = {c: [] for c in classes}
    for rel, _ in rows["test"]:
        c, name = rel.split("/", 1)
        test_files[c].append(name)
    rows["val"] = _stratified(test_files, num_val, rng)
    if num_calib:
        used = {rel for rel, _ in rows["train"]}
        held = {c: [n for n in names if f"{c}/{n}" not in used] for c, names in train.items()}
        if min(len(v) for v in held.values()) * len(held) >= num_calib:
            rows["calib"] = _stratified(held, num_calib, rng)
    for subset, items in rows.items():
        (out_dir / f"{subset}_subset.txt").write_text("".join(f"{rel} {label}\n" for rel, label in items))
    ann, size = {s: out_dir / f"{s}_subset.txt" for s in rows}, {s: len(v) for s, v in rows.items()}
    return DataSplits(root, classes, ann["train"], ann["val"], ann["test"], size["train"], size["val"], size["test"])
