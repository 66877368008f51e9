"""``sd-plugin export``: the model as ONNX: one graph ending at an exit, or the early-exit cascade.

Without ``--policy``: :func:`sd_plugin.deploy.truncate` at ``--exit`` (default: the deepest classifier,
i.e. the plain model) and :func:`sd_plugin.deploy.export_onnx`, one ``.onnx`` file (input ``images``,
output ``logits``, dynamic batch). With ``--policy`` (from ``sd-plugin calibrate``):
:func:`sd_plugin.deploy.export_cascade`, a folder of segment and exit graphs with the thresholds in
``cascade.json``, run by :class:`sd_plugin.deploy.OnnxCascade`. Every graph is checked against PyTorch
on ONNX Runtime unless ``--no-check``.
"""

from __future__ import annotations

import argparse
from typing import Any, Union

from ._load import add_model_args, load_model, plain_doc

__all__ = ["add_parser", "run"]

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-4
EXAMPLE_BATCH = 2

EPILOG = """examples:
  # the plain model (the deepest classifier) of a checkpoint of sd-plugin train-timm
  sd-plugin export work_dirs/r18/checkpoint-last.pth -o r18.onnx
  # a small model that ends at exit 2
  sd-plugin export work_dirs/r18/checkpoint-last.pth --exit 2 -o r18_exit2.onnx
  # the early-exit cascade with calibrated thresholds (a folder; run it with sd_plugin.deploy.OnnxCascade)
  sd-plugin export work_dirs/x/epoch_10.pth --config my_sd_config.py --img-size 32 --policy policy.json -o cascade/
"""


def _exit_ref(text: str) -> Union[int, str]:
    return int(text) if text.isdigit() else text


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX: the model up to one exit, or the early-exit cascade",
        description=plain_doc(__doc__),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("export")
    g.add_argument("-o", "--out", required=True, help="the .onnx file, or with --policy the cascade's folder")
    g.add_argument("--exit", type=_exit_ref, default="deepest", help="1 ... E, 'exitN' or 'deepest' (default)")
    g.add_argument("--policy", help="ExitPolicy JSON (sd-plugin calibrate): export the early-exit cascade")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    g.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="tolerance of that check (default: %(default)s)")
    g.add_argument("--no-check", action="store_true", help="do not compare ONNX Runtime's outputs with PyTorch's")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy import ExitPolicy, export_cascade, export_onnx, truncate
    from ..deploy.onnx import missing_onnx_modules

    missing = missing_onnx_modules(run=not args.no_check)
    if missing:
        raise ValueError(f"export needs {' and '.join(missing)}: pip install 'sd-plugin[export]'.")
    if args.policy and args.exit != "deepest":
        raise ValueError("--policy exports the whole cascade: leave --exit out (it picks one graph's last exit).")
    policy = ExitPolicy.load(args.policy) if args.policy else None
    loaded = load_model(args)
    example = loaded.example_input(EXAMPLE_BATCH)
    check = not args.no_check
    if policy is not None:
        path = export_cascade(
            loaded.model, example, args.out, policy, opset_version=args.opset, check=check, atol=args.atol
        )
        print(f"wrote the cascade of {loaded.name} to {args.out} (manifest {path})")
        return 0
    net = truncate(loaded.model, exit=args.exit, example_input=example[:1])
    path = export_onnx(net, example, args.out, opset_version=args.opset, check=check, atol=args.atol)
    print(f"wrote {path}: {loaded.name} up to {net.exit_name}" + (", checked on ONNX Runtime" if check else ""))
    return 0
