"""Where does the self-distillation arm's extra training time go? (MMPretrain route, ``--profile``.)

One training step is split into the phases ``model.train_step`` runs
(preprocessing, forward with loss, backward, optimiser step), timed for both
arms on the same batches, alternating ABBA, medians. The sd arm's forward is
then split further by timing its parts in isolation: the exits alone
(``forward_exit`` on features tapped from the backbone, forward + backward) and
the self-distillation loss alone (on a fixed ``SelfDistillOutput``, forward +
backward). The FLOPs ratio says how much of the step the exits *should* cost;
the breakdown says which phase costs more than that.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Sequence

import torch

from tools.bench.cost import TrainArm

__all__ = ["step_breakdown", "render_breakdown"]


def _phases(arm: TrainArm, optim_wrapper: Any) -> Callable[[Any], Dict[str, float]]:
    model: Any = arm.model

    def run(batch: Any) -> Dict[str, float]:
        t0 = time.perf_counter()
        data = model.data_preprocessor(batch, True)
        t1 = time.perf_counter()
        losses = model(**data, mode="loss")
        loss, _ = model.parse_losses(losses)
        t2 = time.perf_counter()
        optim_wrapper.backward(loss)
        t3 = time.perf_counter()
        optim_wrapper.step()
        optim_wrapper.zero_grad()
        t4 = time.perf_counter()
        return {"preprocess": t1 - t0, "forward+loss": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}

    return run


def _parts(sd: Any, batch: Any) -> Callable[[], Dict[str, float]]:
    """Isolated timings of the sd model's exits and loss (forward + backward each)."""
    from sd_plugin.core import FeatureTaps, SelfDistillOutput, self_distill_losses

    data = sd.data_preprocessor(batch, True)
    with torch.no_grad(), FeatureTaps(sd.tapped_module(), sd.exit_points) as taps:
        deepest = sd.forward_deepest(data["inputs"])
    feats = [f.detach() for f in taps.features]
    with torch.no_grad():
        exit_logits = [sd.forward_exit(k, f) for k, f in enumerate(feats)]
        exit_feats = [sd.exit_necks[k](f)[0] for k, f in enumerate(feats)]
    target = torch.stack([s.gt_label.reshape(-1)[0] for s in data["data_samples"]])

    def run() -> Dict[str, float]:
        t0 = time.perf_counter()
        logits = [sd.forward_exit(k, f) for k, f in enumerate(feats)]
        torch.stack(logits).sum().backward()
        t1 = time.perf_counter()
        out = SelfDistillOutput(
            logits=deepest.clone().requires_grad_(),
            features=torch.randn_like(exit_feats[0]),
            exit_logits=[lg.clone().requires_grad_() for lg in exit_logits],
            exit_features=[f.clone().requires_grad_() for f in exit_feats],
        )
        terms = self_distill_losses(out, target, sd.sd_config)
        torch.stack(list(terms.values())).sum().backward()
        t2 = time.perf_counter()
        sd.zero_grad(set_to_none=True)
        return {"exits fwd+bwd (isolated)": t1 - t0, "sd loss fwd+bwd (isolated)": t2 - t1}

    return run


def step_breakdown(
    arms: Sequence[TrainArm], batches: Sequence[Any], rounds: int, warmup: int
) -> Dict[str, Dict[str, float]]:
    """Median seconds per phase for each arm (MMPretrain route), plus the sd arm's isolated exit and loss timings."""
    for a in arms:
        if a.optimizer is None or not hasattr(a.model, "parse_losses"):
            raise TypeError("the step breakdown needs MMPretrain arms (model.parse_losses and an OptimWrapper).")
    runners = {a.name: _phases(a, a.optimizer) for a in arms}
    sd = next(a for a in arms if a.name == "sd").model
    parts = _parts(sd, batches[0])
    raw: Dict[str, List[Dict[str, float]]] = {a.name: [] for a in arms}
    raw["sd_parts"] = []
    for a in arms:
        a.model.train()
    for i in range(warmup + rounds):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for a in order:
            t = runners[a.name](batches[i % len(batches)])
            if i >= warmup:
                raw[a.name].append(t)
        p = parts()
        if i >= warmup:
            raw["sd_parts"].append(p)
    return {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in raw.items()}


def render_breakdown(b: Dict[str, Dict[str, float]], flops_ratio: float) -> str:
    """Markdown table: phase, plain ms, sd ms, sd - plain, and the FLOPs-proportional expectation."""
    lines = [
        "| phase | plain (ms) | sd (ms) | sd - plain (ms) | sd / plain |",
        "|---|---|---|---|---|",
    ]
    total_p = total_s = 0.0
    for phase, tp in b["plain"].items():
        ts = b["sd"][phase]
        total_p, total_s = total_p + tp, total_s + ts
        lines.append(f"| {phase} | {tp * 1e3:.1f} | {ts * 1e3:.1f} | {(ts - tp) * 1e3:+.1f} | {ts / tp:.2f}x |")
    lines.append(
        f"| **step** | {total_p * 1e3:.1f} | {total_s * 1e3:.1f} | {(total_s - total_p) * 1e3:+.1f} | "
        f"{total_s / total_p:.2f}x |"
    )
    lines.append("")
    lines.append(
        f"FLOPs-proportional sd step: {total_p * flops_ratio * 1e3:.1f} ms ({flops_ratio:.3f}x). Isolated parts of "
        "the sd arm: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in b["sd_parts"].items()) + "."
    )
    return "\n".join(lines) + "\n"
