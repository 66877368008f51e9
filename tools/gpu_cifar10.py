"""CE vs BYOT self-distillation on full CIFAR-10 with a full-width ResNet-18, sized for one GPU in about 9 minutes.

The published trend (BYOT, ICCV 2019, CIFAR-100 ResNet-18: baseline 77.09, deepest 78.64, ensemble 79.67) at a
shortened schedule: timm's ResNet-18 with the CIFAR stem, SGD with a warm-up epoch and cosine decay, crop and flip on
the device from data decoded once into memory, bfloat16 and channels-last on CUDA, the same seed for every arm.
Writes ``<out>/gpu_cifar10.{json,md,png}``: per arm the test top-1 of every classifier and the ensemble, wall time.

    python tools/gpu_cifar10.py ~/.cache/sd_plugin/cifar10 --epochs 30 --out docs/results     # one H100
    python tools/gpu_cifar10.py demo_data/cifar10_mini --device cpu --epochs 1 --max-train 256  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import sd_plugin
from sd_plugin.core.ensemble import ensemble_logits
from sd_plugin.core.naming import exit_names
from sd_plugin.deploy import all_exit_logits

ARMS = {"ce": (False, 0.0), "ls": (False, 0.1), "byot": (True, 0.0), "byot+ls": (True, 0.1)}
MEAN, STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)  # of these JPEGs (see ../shared/data/README)
BASE_LR, BASE_BATCH, MOMENTUM, WEIGHT_DECAY, PAD = 0.1, 128, 0.9, 5e-4, 4


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="ImageFolder root with train/ and test/")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=sorted(ARMS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-train", type=int, default=0, help="first N training images only (smoke runs)")
    p.add_argument("--out", type=Path, default=Path("work_dirs/gpu_cifar10"))
    return p.parse_args(argv)


def load_split(root: Path, limit: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) uint8 images and (N,) labels of an ImageFolder split, decoded once."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).glob("*.jpg"))]
    if limit:
        files = [files[j] for j in np.random.default_rng(0).permutation(len(files))[:limit]]
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda fl: np.asarray(Image.open(fl[0]).convert("RGB")), files))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor([i for _, i in files])


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per sample, on the device (x: (N, 3, H, W))."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD)).permute(0, 2, 3, 1)  # (N, H + 2P, W + 2P, 3)
    dy = torch.randint(0, 2 * PAD + 1, (n, 1), generator=g).to(x.device)
    dx = torch.randint(0, 2 * PAD + 1, (n, 1), generator=g).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]
    flip = (torch.rand(n, 1, generator=g) < 0.5).to(x.device)
    cols = torch.where(flip[:, :, None], cols.flip(2), cols)
    return padded[torch.arange(n, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)


def model_for(arm: str, device: torch.device) -> nn.Module:
    net = timm.create_model("resnet18", num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem
    net.maxpool = nn.Identity()
    net = sd_plugin.wrap(net, input_size=(3, 32, 32)) if ARMS[arm][0] else net
    return net.to(device, memory_format=torch.channels_last)


def run_arm(arm: str, data: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = model_for(arm, device)
    exits, smoothing = ARMS[arm]
    criterion = (sd_plugin.SelfDistillLoss if exits else nn.CrossEntropyLoss)(label_smoothing=smoothing)
    x_train, y_train = data["train"]
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    lr = BASE_LR * args.batch_size / BASE_BATCH
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))
    norm = lambda u8: ((u8.float() - mean) / std).contiguous(memory_format=torch.channels_last)  # noqa: E731
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size : (s + 1) * args.batch_size]
            x = norm(augment(x_train[idx].to(device, non_blocking=True), g))
            with autocast:
                loss = criterion(model(x), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"arm": arm, "train_wall_s": wall, "top1": evaluate(model, exits, data["test"], norm, autocast, device)}


@torch.no_grad()
def evaluate(model: nn.Module, exits: bool, test: Any, norm: Any, autocast: Any, device: torch.device) -> Dict:
    model.eval()
    x_test, y_test = test
    chunks = []
    for i in range(0, len(y_test), 1000):
        with autocast:
            x = norm(x_test[i : i + 1000].to(device))
            chunks.append((all_exit_logits(model, x) if exits else model(x)[None]).float().cpu())
    z = torch.cat(chunks, dim=1)
    acc = lambda lg: round(float((lg.argmax(-1) == y_test).float().mean()) * 100, 2)  # noqa: E731
    if not exits:
        return {"deepest": acc(z[0])}
    out = {name: acc(lg) for name, lg in zip(exit_names(z.shape[0] - 1), z)}
    return {**out, "ensemble": acc(ensemble_logits(z))}


def write(results: List[Dict[str, Any]], args: argparse.Namespace, device_name: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "device": device_name, "torch": torch.__version__}
    meta.update(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, train_images=args.train_images)
    (args.out / "gpu_cifar10.json").write_text(json.dumps({"meta": meta, "arms": results}, indent=1) + "\n")
    names = sorted({k for r in results for k in r["top1"]}, key=lambda k: (k != "deepest", k))
    lines = [f"`{meta['command']}` on {device_name}, torch {meta['torch']}, {args.epochs} epochs.", ""]
    lines += ["| arm | " + " | ".join(names) + " | train wall (s) |", "|---" * (len(names) + 2) + "|"]
    for r in results:
        cells = [str(r["top1"].get(n, "-")) for n in names]
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {r['train_wall_s']:.0f} |")
    (args.out / "gpu_cifar10.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["arm"] for r in results], [r["top1"]["deepest"] for r in results], color="tab:blue")
    ax.set_ylabel("test top-1, deepest classifier (%)")
    ax.set_title(f"CIFAR-10 ResNet-18, {args.epochs} epochs, {device_name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "gpu_cifar10.png", dpi=120)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    data = {"train": load_split(args.data / "train", args.max_train), "test": load_split(args.data / "test")}
    args.train_images = len(data["train"][1])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    results = [run_arm(arm, data, args) for arm in args.arms]
    write(results, args, device_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
