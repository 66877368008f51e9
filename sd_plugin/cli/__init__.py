"""``sd-plugin``: train a self-distillation model, then use it.

Subcommands: ``train`` (an MMPretrain config through mmengine's Runner) and ``train-timm`` (a timm model on an
ImageFolder), both also under ``torchrun``; ``report`` (per-exit accuracy, parameters, FLOPs, ensemble, calibrated
early exit), ``calibrate`` (early-exit thresholds to an ExitPolicy JSON), ``strip`` (the original model's checkpoint)
and ``export`` (ONNX: the model up to an exit, or the early-exit cascade). Each one is a thin layer over the
library's own functions (:mod:`sd_plugin.deploy`, :mod:`sd_plugin.timm_adapter`, sd_plugin's mmengine components).
Installed as the ``sd-plugin`` console script; ``python -m sd_plugin`` is the same.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from typing import List, Optional, Sequence

from ..version import __version__
from . import calibrate, export, report, strip, train, train_timm
from ._load import plain_doc

__all__ = ["main", "build_parser"]

PROG = "sd-plugin"
#: Exit status of a run refused for bad input (argparse's usage errors exit with 2).
EXIT_ERROR = 1

EPILOG = """examples:
  sd-plugin train-timm ~/data/cifar10 --model resnet18 --img-size 32 --epochs 10 --output work_dirs/r18
  sd-plugin train my_sd_config.py --work-dir work_dirs/mm
  sd-plugin report work_dirs/r18/checkpoint-last.pth --data ~/data/cifar10 --split test
  sd-plugin calibrate work_dirs/r18/checkpoint-last.pth --data ~/data/cifar10 --split val --max-drop 1 -o policy.json
  sd-plugin export work_dirs/r18/checkpoint-last.pth --policy policy.json -o cascade/
  sd-plugin strip work_dirs/r18/checkpoint-last.pth r18_plain.pth

A model is given by its checkpoint: one written by 'sd-plugin train-timm' (it names the timm architecture), or
an MMPretrain one with its config (--config). 'sd-plugin COMMAND --help' lists a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``sd-plugin`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=plain_doc((__doc__ or "").split("\n\n")[0]),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    # torch.distributed.launch (MMPretrain's dist_train.sh) puts --local-rank=N right after `-m sd_plugin`.
    parser.add_argument("--local-rank", "--local_rank", dest="launcher_local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, train_timm, report, calibrate, strip, export):
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``sd-plugin`` with ``argv`` (default: the command line); the exit status."""
    words: List[str] = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    args.argv = words
    if args.launcher_local_rank is not None:
        args.local_rank = args.launcher_local_rank  # what `sd-plugin train --local-rank N` would have set
    try:
        return int(args.run(args))
    except (ValueError, TypeError, OSError, pickle.UnpicklingError) as err:
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
