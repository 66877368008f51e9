"""Per-exit report of a self-distillation model: accuracy, cost, latency and calibrated early exit.

For every exit (numbered as the training log names them: exit1 ... deepest) and
the ensemble (mean softmax of all): top-1/top-5 on the test data, parameters and
FLOPs up to that exit (mmengine's FlopAnalyzer on the truncated model), CPU
latency at batch 1 and 32 (medians, interleaved). Then the early-exit curve (a
shared max-prob threshold swept, accuracy vs average FLOPs) and calibrated
operating points: thresholds chosen on *validation* data (a held-out part of the
train split, ``--calib-split``/``--calib-ann``), every reported figure measured on
the test data: top-1, exit shares, FLOPs, the FLOPs-weighted ideal speed-up and
the measured speed-up of early exit over the plain model at batch 1 and 32, in
PyTorch eager mode and as an ONNX cascade on ONNX Runtime (against the plain
model's ONNX export), with the A/A noise floor.

Writes ``<out-dir>/<name>.json``, ``.md`` and ``.png``.

Examples:
    python -m tools.analyze_exits --mm-config configs/my_sd_config.py --checkpoint work_dirs/x/epoch_10.pth \
        --data ~/.cache/sd_plugin/cifar10 --split test --calib-split train --calib-ann held_out_train.txt
    python -m tools.analyze_exits --timm-model resnet10t --checkpoint sd.pth --num-classes 10 --img-size 32 \
        --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 --data ~/.cache/sd_plugin/cifar10 --split test \
        --calib-ann held_out_train.txt
"""

from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from sd_plugin._io import atomic_write, atomic_write_path
from sd_plugin.deploy import (
    ExitLogits,
    ExitPolicy,
    calibrate,
    collect_exit_logits,
    evaluate_policy,
    exit_costs,
    truncate,
)
from sd_plugin.deploy._timing import interleaved_medians
from tools._exits_speed import measure_speed


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mm-config", help="MMPretrain config with model.type='SelfDistillClassifier'")
    src.add_argument("--timm-model", help="timm model name (the model is wrapped with sd_plugin.wrap)")
    p.add_argument("--checkpoint", required=True, help="self-distillation checkpoint (state_dict or {'state_dict'})")
    p.add_argument("--num-classes", type=int, help="timm: number of classes")
    p.add_argument("--img-size", type=int, help="input size (timm: required; MMPretrain: default 32)")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean (timm: default the model's data config)")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std")
    p.add_argument("--data", required=True, help="ImageFolder root holding the split folder")
    p.add_argument("--split", default="test", help="test split (every reported figure is measured on it)")
    p.add_argument("--max-samples", type=int, default=2000, help="test samples used (a seeded shuffle of the split)")
    p.add_argument("--calib-split", default="train", help="split holding the validation (calibration) images")
    p.add_argument(
        "--calib-ann",
        help="annotation file ('relative/path.jpg label' per line, relative to the calib split) of the validation "
        "images: a part of the calib split the model was not trained on. Without it the whole calib split is "
        "drawn from, which is only right when the model never saw it.",
    )
    p.add_argument("--calib-samples", type=int, default=2000, help="validation samples used for the thresholds")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime timing of the cascade")
    p.add_argument("--b1-images", type=int, default=64, help="test images timed one by one (batch 1)")
    p.add_argument("--b32-images", type=int, default=None, help="test images timed in batches of 32 (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (medians are reported)")
    p.add_argument("--max-drops", type=float, nargs="+", default=[0.5, 1.0], help="calibration targets (top-1 points)")
    p.add_argument("--out-dir", default="work_dirs/analyze_exits")
    p.add_argument("--name", help="output file stem (default: analyze_<model>)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for timing (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.timm_model and (args.num_classes is None or args.img_size is None):
        p.error("--timm-model needs --num-classes and --img-size.")
    if args.calib_split == args.split and not args.calib_ann:
        p.error("calibrating on the test split would report fitted figures: give --calib-split or --calib-ann.")
    return args


def _state_dict(path: str) -> Dict[str, Any]:
    from sd_plugin._safe_globals import load_checkpoint_file

    ckpt = load_checkpoint_file(path, "--checkpoint")
    return ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt


def load_model(args: argparse.Namespace) -> Tuple[nn.Module, Any, str]:
    """The model with exits (eval mode), the image transform and a short name."""
    from torchvision import transforms as T

    if args.timm_model:
        import timm
        from timm.data import create_transform, resolve_data_config

        import sd_plugin

        size = args.img_size
        model = sd_plugin.wrap(
            timm.create_model(args.timm_model, num_classes=args.num_classes), input_size=(3, size, size)
        )
        model.load_state_dict(_state_dict(args.checkpoint), strict=True)
        cfg = resolve_data_config({"input_size": (3, size, size), "crop_pct": 1.0}, model=model.unwrap())
        if args.mean:
            cfg.update(mean=tuple(args.mean), std=tuple(args.std))
        return model.eval(), create_transform(**cfg), args.timm_model
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS

    import sd_plugin  # noqa: F401

    cfg = Config.fromfile(args.mm_config)
    model = MODELS.build(cfg.model)
    load_checkpoint(model, args.checkpoint, map_location="cpu", strict=True)
    pre = cfg.model.get("data_preprocessor") or cfg.get("data_preprocessor") or {}
    mean = [m / 255 for m in pre.get("mean", (0.0, 0.0, 0.0))]
    std = [s / 255 for s in pre.get("std", (255.0, 255.0, 255.0))]
    size = args.img_size or 32
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    return model.eval(), tf, Path(args.mm_config).stem


class _Listed(torch.utils.data.Dataset):
    """Images of an annotation file ('relative/path.jpg label' per line) under ``folder``."""

    def __init__(self, folder: str, ann: str, transform: Any) -> None:
        from PIL import Image

        self.open = Image.open
        self.items = []
        for line in Path(ann).read_text().splitlines():
            if line.strip():
                rel, label = line.rsplit(" ", 1)
                self.items.append((osp.join(folder, rel), int(label)))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.transform(self.open(path).convert("RGB")), label


def load_data(args: argparse.Namespace, transform: Any, calib: bool = False) -> DataLoader:
    """The test data (``--split``) or the validation data used for the thresholds (``--calib-*``)."""
    from torchvision.datasets import ImageFolder

    split, n = (args.calib_split, args.calib_samples) if calib else (args.split, args.max_samples)
    folder = osp.join(osp.expanduser(args.data), split)
    ds: Any = _Listed(folder, args.calib_ann, transform) if calib and args.calib_ann else ImageFolder(folder, transform)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed + int(calib)))[:n]
    return DataLoader(Subset(ds, order.tolist()), batch_size=args.batch_size, shuffle=False, num_workers=0)


def _collect(model: nn.Module, loader: DataLoader) -> Tuple[ExitLogits, torch.Tensor]:
    xs, ys = zip(*loader)
    return collect_exit_logits(model, zip(xs, ys)), torch.cat(xs)


def _topk(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, dim=-1).indices == targets[:, None]).any(-1).float().mean()) * 100


class _AllExits(nn.Module):
    """Every exit plus the deepest classifier in one pass (what the ensemble costs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return collect_exit_logits(self.model, [(x, torch.zeros(x.shape[0]))]).logits.softmax(-1).mean(0)


def per_exit_rows(model: nn.Module, data: ExitLogits, images: torch.Tensor, repeats: int) -> List[Dict[str, Any]]:
    """Accuracy, parameters, FLOPs and latency of every exit, the deepest and the ensemble."""
    costs = exit_costs(model, images[:1])
    e = data.num_exits
    names = data.names
    nets: Dict[str, nn.Module] = {names[k]: truncate(model, exit=k + 1, example_input=images[:1]) for k in range(e + 1)}
    nets["ensemble"] = _AllExits(model).eval()
    b32 = images[:32].repeat((32 + len(images) - 1) // len(images), 1, 1, 1)[:32]
    lat1 = interleaved_medians({n: (lambda m=m: m(images[:1])) for n, m in nets.items()}, repeats * 4)
    lat32 = interleaved_medians({n: (lambda m=m: m(b32)) for n, m in nets.items()}, repeats)
    rows = []
    ens = data.logits.softmax(-1).mean(0)
    for k in range(e + 2):
        name = names[k] if k <= e else "ensemble"
        logits = data.logits[k] if k <= e else ens
        flops = costs.flops[k] if k <= e else costs.answer_costs()[-1]
        params = costs.params[k] if k <= e else sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "exit": name,
                "number": k + 1 if k <= e else None,
                "top1": _topk(logits, data.targets, 1),
                "top5": _topk(logits, data.targets, 5),
                "params": params,
                "flops": flops,
                "flops_fraction": flops / costs.flops[-1],
                "latency_b1_ms": lat1[name] * 1e3,
                "latency_b32_ms": lat32[name] * 1e3,
            }
        )
    return rows


def sweep(data: ExitLogits, answer_costs: List[int], steps: int = 41) -> List[Dict[str, float]]:
    """The early-exit curve: one max-prob threshold shared by every exit, from 0 to 1."""
    out = []
    for t in torch.linspace(0, 1, steps).tolist():
        stats = evaluate_policy(data, ExitPolicy([t] * data.num_exits), answer_costs)
        out.append({"threshold": t, "top1": stats["top1"], "flops": stats["cost"]})
    return out


def operating_points(
    model: nn.Module,
    cal: ExitLogits,
    test: ExitLogits,
    images: torch.Tensor,
    answer_costs: List[int],
    plain_flops: int,
    args: Any,
) -> List[Dict[str, Any]]:
    """Thresholds calibrated on the validation data; accuracy, shares and wall clock measured on the test data."""
    points = []
    for drop in args.max_drops:
        policy = calibrate(cal, max_drop=drop, costs=answer_costs)
        stats = evaluate_policy(test, policy, answer_costs)
        speed = measure_speed(
            model,
            policy,
            images[: args.b32_images],
            repeats=args.repeats,
            num_singles=args.b1_images,
            onnx=not args.no_onnx,
            threads=args.threads,
        )
        points.append(
            {
                "max_drop": drop,
                "thresholds": policy.thresholds,
                "calibration": policy.info["calibration"],
                "test": {**stats, "flops": stats["cost"], "num_samples": test.targets.numel()},
                "ideal_speedup": plain_flops / stats["cost"],
                **speed,
            }
        )
    return points


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"## Exits of `{report['model']}` ({report['num_samples']} images of {report['data']})",
        "",
        "| exit | top-1 | top-5 | params (M) | MFLOPs | FLOPs % | latency b1 (ms) | latency b32 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["exits"]:
        lines.append(
            f"| {r['exit']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['params'] / 1e6:.3f} | {r['flops'] / 1e6:.1f} | "
            f"{100 * r['flops_fraction']:.1f} | {r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.1f} |"
        )
    lines += [
        "",
        f"Early exit, thresholds calibrated on {report['calib_data']} ({report['calib_samples']} images), everything "
        f"below measured on the test data ({report['num_samples']} images); speed-ups are medians of interleaved "
        "runs against the plain model (A/A: the plain model against itself, the noise floor):",
        "",
        "| max drop | thresholds | top-1 (deepest) | exit shares | avg MFLOPs (% of plain) | ideal | eager b1 (A/A) "
        "| eager b32 (A/A) | ONNX b1 | ONNX b32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain_flops = report["exits"][-2]["flops"]
    for p in report["operating_points"]:
        h = p["test"]
        ts = ", ".join("-" if t is None else f"{t:.3f}" for t in p["thresholds"])
        shares = ", ".join(f"{100 * s:.0f}%" for s in h["exit_share"].values())
        onnx = [f"{p[k]:.2f}x" if k in p else "-" for k in ("onnx_speedup_b1", "onnx_speedup_b32")]
        lines.append(
            f"| {p['max_drop']} | {ts} | {h['top1']:.2f} ({h['deepest_top1']:.2f}) | {shares} | {h['flops'] / 1e6:.1f} "
            f"({100 * h['flops'] / plain_flops:.0f}%) | {p['ideal_speedup']:.2f}x | {p['speedup_b1']:.2f}x "
            f"({p['aa_b1']:.2f}) | {p['speedup_b32']:.2f}x ({p['aa_b32']:.2f}) | {onnx[0]} | {onnx[1]} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in report["exits"] if r["number"] is not None]
    ax.plot([r["flops"] / 1e6 for r in rows], [r["top1"] for r in rows], "o-", label="single exit")
    for r in rows:
        ax.annotate(r["exit"], (r["flops"] / 1e6, r["top1"]), textcoords="offset points", xytext=(4, -10))
    ens = report["exits"][-1]
    ax.plot([ens["flops"] / 1e6], [ens["top1"]], "s", label="ensemble")
    curve = report["early_exit_curve"]
    ax.plot([c["flops"] / 1e6 for c in curve], [c["top1"] for c in curve], ".--", label="early exit (threshold sweep)")
    for p in report["operating_points"]:
        h = p["test"]
        ax.plot([h["flops"] / 1e6], [h["top1"]], "*", ms=12, label=f"calibrated, max drop {p['max_drop']} (test)")
    ax.set_xlabel("MFLOPs per image (average for early exit)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{report['model']}: accuracy vs compute per exit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, transform, name = load_model(args)
    data, images = _collect(model, load_data(args, transform))
    cal, _ = _collect(model, load_data(args, transform, calib=True))
    rows = per_exit_rows(model, data, images, args.repeats)
    costs = exit_costs(model, images[:1])
    answer = costs.answer_costs()
    report: Dict[str, Any] = {
        "model": name,
        "checkpoint": args.checkpoint,
        "data": f"{args.data}/{args.split}",
        "num_samples": int(data.targets.numel()),
        "calib_data": f"{args.data}/{args.calib_split}" + (f" listed in {args.calib_ann}" if args.calib_ann else ""),
        "calib_samples": int(cal.targets.numel()),
        "torch_threads": torch.get_num_threads(),
        "exits": rows,
        "answer_flops": answer,
        "early_exit_curve": sweep(data, answer),
        "operating_points": operating_points(model, cal, data, images, answer, costs.flops[-1], args),
        "command": " ".join(["python -m tools.analyze_exits", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"analyze_{name}"
    md = markdown(report)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", md)):
        with atomic_write(out / f"{stem}{suffix}", "w") as f:
            f.write(text)
    plot(report, out / f"{stem}.png")
    print(md)
    print(f"wrote {out / stem}.json, .md, .png")
    return report


if __name__ == "__main__":
    main()
