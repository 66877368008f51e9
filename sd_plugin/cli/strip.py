"""``sd-plugin strip``: drop the exits from a checkpoint, so the original model loads it with ``strict=True``.

Built on :func:`sd_plugin.deploy.strip_checkpoint`: the deepest classifier is the user's own model, so
only the exit weights go (and the optimizer and scheduler state of the training run). The result is
checked by building the original model and loading it strictly: the timm architecture a
``sd-plugin train-timm`` checkpoint names, or the original MMPretrain config given by ``--check-config``.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Mapping

from ._load import create_timm, num_classes_from_exits, plain_doc, read_checkpoint, state_dict_of

__all__ = ["add_parser", "run"]

EPILOG = """examples:
  # a checkpoint of sd-plugin train-timm: the result loads into timm.create_model(arch) (checked)
  sd-plugin strip work_dirs/r18/checkpoint-last.pth r18_plain.pth
  # an MMPretrain checkpoint, checked against the original config (without the two sd_plugin lines)
  sd-plugin strip work_dirs/x/epoch_10.pth plain.pth --check-config configs/original_config.py
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "strip",
        help="remove the exits from a checkpoint (the original model loads it strictly)",
        description=plain_doc(__doc__),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="self-distillation checkpoint (.pth)")
    p.add_argument("dst", help="stripped checkpoint to write")
    p.add_argument("--check-config", help="original MMPretrain config: build it and load the result strictly")
    p.add_argument("--timm-model", help="timm architecture to check against, for a checkpoint that names none")
    p.add_argument("--num-classes", type=int, help="classes of that timm model (default: read from the exits)")
    p.add_argument("--no-check", action="store_true", help="do not build the original model to check the result")
    p.set_defaults(run=run)


def _timm_meta(args: argparse.Namespace, ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """What a timm checkpoint says about its model: arch, classes, input size (empty when it names no arch)."""
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), Mapping) else {}
    arch = args.timm_model or ckpt.get("arch") or saved.get("model")  # type: ignore[union-attr]
    if not arch:
        return {}
    num_classes = args.num_classes or saved.get("num_classes") or num_classes_from_exits(state_dict_of(ckpt))  # type: ignore[union-attr]
    return {"arch": arch, "num_classes": num_classes, "img_size": saved.get("img_size")}  # type: ignore[union-attr]


def _strip_timm(ckpt: Mapping[str, Any], meta: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`strip_checkpoint`'s result for a timm checkpoint, with the timm adapter's exit prefixes only (so no
    other adapter, MMPretrain's, is imported) and what the checkpoint says about its model in ``'meta'``."""
    from ..deploy import strip_state_dict
    from ..timm_adapter.model import SelfDistillModel

    state = state_dict_of(ckpt)
    plain = strip_state_dict(state, SelfDistillModel.exit_state_prefixes)
    if len(plain) == len(state):
        raise ValueError("the checkpoint has no exit weights to strip: is it a self-distillation checkpoint?")
    old = ckpt.get("meta")
    info = {**(old if isinstance(old, Mapping) else {}), **{k: v for k, v in meta.items() if v is not None}}
    info.update(sd_plugin_stripped=True, sd_plugin_dropped_keys=len(state) - len(plain))
    return {"meta": info, "state_dict": plain}


def run(args: argparse.Namespace) -> int:
    from .._io import atomic_save
    from ..deploy import strip_checkpoint
    from ..deploy.strip import check_against_config

    ckpt = read_checkpoint(args.src, "src")
    meta = _timm_meta(args, ckpt)
    stripped = _strip_timm(ckpt, meta) if meta else strip_checkpoint(ckpt)
    checked = []
    if not args.no_check and args.check_config:
        check_against_config(stripped, args.check_config)
        checked.append(args.check_config)
    if not args.no_check and meta:
        if not meta["num_classes"]:
            raise ValueError(f"the number of classes of {args.src} is not known: give --num-classes (or --no-check).")
        plain = create_timm(meta["arch"], int(meta["num_classes"]), meta["img_size"])
        try:
            plain.load_state_dict(stripped.get("state_dict", stripped), strict=True)
        except RuntimeError as err:
            raise ValueError(f"the stripped weights do not load into timm's {meta['arch']}: {err}") from err
        checked.append(f"timm {meta['arch']}")
    atomic_save(stripped, args.dst)
    n = len(stripped.get("state_dict", stripped))
    dropped = len(state_dict_of(ckpt)) - n
    check = f"; loads strictly into {' and '.join(checked)}" if checked else ""
    print(f"wrote {args.dst}: {n} tensors, {dropped} exit tensors dropped{check}")
    return 0
