"""Survey: SelfDistillClassifier on one packaged config per MMPretrain family (not a test; run by hand).

    .venv/bin/python tests/mmpretrain/_survey.py [--size 64] [--limit-s 120]

For every config directory under mmpretrain's ``.mim/configs`` it picks the
smallest-looking ImageClassifier config, sets 5 classes, builds it as a
SelfDistillClassifier, runs one ``mode='loss'`` step with backward and checks
that predict equals the plain ImageClassifier. Prints one line per family.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from typing import Any, List, Optional

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _mmp_helpers import MMPRETRAIN_CONFIGS, batch, build_pair, exit_param_grads, load_model_cfg  # noqa: E402

SMALL = ("atto", "xxsmall", "xsmall", "tiny", "small", "s0", "b0", "18", "a0", "w18", "400mf", "-s", "mini", "nano")


def _rank(name: str) -> tuple:
    for i, key in enumerate(SMALL):
        if key in name:
            return (i, "384" in name, len(name), name)
    return (len(SMALL), "384" in name, len(name), name)


def pick(family: str) -> Optional[str]:
    from mmengine import Config

    folder = os.path.join(MMPRETRAIN_CONFIGS, family)
    names = sorted((f for f in os.listdir(folder) if f.endswith(".py")), key=_rank)
    for name in names:
        try:
            cfg = Config.fromfile(os.path.join(folder, name))
        except Exception:
            continue
        model = cfg.get("model", {})
        if model.get("type") == "ImageClassifier" and isinstance(model.get("head"), dict):
            return f"{family}/{name}"
    return None


def _timeout(*_: Any) -> None:
    raise TimeoutError


def check(rel: str, size: int) -> str:
    cfg = load_model_cfg(rel)
    bb = cfg["backbone"]
    if "img_size" in bb:
        bb["img_size"] = size
    sd, plain = build_pair(cfg)
    sd.train()
    inputs, samples = batch(sd, size)
    losses = sd(inputs, samples, mode="loss")
    sum(losses.values()).backward()
    dead = [k for k, g in exit_param_grads(sd).items() if g <= 0]
    sd.eval()
    plain.eval()
    plain.load_state_dict({k: v for k, v in sd.state_dict().items() if not k.startswith("exit_")})
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        same = torch.allclose(sd(x, mode="tensor"), plain(x, mode="tensor"), atol=1e-5)
    exits = ", ".join(f"{p.module}({p.fmt},{p.channels},s{p.stride})" for p in sd.exit_points)
    status = "OK" if same and not dead else f"MISMATCH same={same} dead_grads={len(dead)}"
    return f"{status} {sd.num_exits} exits: {exits}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit-s", type=int, default=120)
    parser.add_argument("families", nargs="*")
    args = parser.parse_args()
    families: List[str] = args.families or sorted(
        d for d in os.listdir(MMPRETRAIN_CONFIGS) if os.path.isdir(os.path.join(MMPRETRAIN_CONFIGS, d))
    )
    signal.signal(signal.SIGALRM, _timeout)
    ok = tried = 0
    for family in families:
        if family.startswith("_"):
            continue
        rel = pick(family)
        if rel is None:
            continue
        tried += 1
        t = time.time()
        signal.alarm(args.limit_s)
        try:
            line = check(rel, args.size)
        except TimeoutError:
            line = f"TIMEOUT after {args.limit_s}s"
        except Exception as e:  # report and go on
            last = traceback.extract_tb(e.__traceback__)[-1]
            line = f"FAIL {type(e).__name__}: {str(e)[:300]} [{os.path.basename(last.filename)}:{last.lineno}]"
        finally:
            signal.alarm(0)
        ok += line.startswith("OK")
        print(f"{rel:70s} {time.time() - t:6.1f}s {line}", flush=True)
    print(f"{ok}/{tried} families OK")


if __name__ == "__main__":
    main()
