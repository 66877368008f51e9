"""The front-door demo (`make demo`: examples/quickstart.py) runs end to end and prints the per-exit table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_demo_prints_per_exit_table(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "1", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout[run.stdout.index("| classifier |") :].splitlines()
    names = [row.split("|")[1].strip() for row in table[2:] if row.startswith("|")]
    assert names == ["exit1", "exit2", "exit3", "deepest", "ensemble", "plain model (same budget)", "deepest - plain"]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    # The plain model's row is its own training run's top-1, and the difference row is deepest minus it.
    cells = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in table[2:] if row.startswith("|")}
    assert float(cells["plain model (same budget)"]) == pytest.approx(summary["plain_top1"], abs=0.05)
    deepest = next(v for k, v in summary["metrics"].items() if k.endswith("deepest_top1"))
    assert float(cells["deepest - plain"]) == pytest.approx(deepest - summary["plain_top1"], abs=0.051)
    assert "binomial noise" in run.stdout
    # A model ending at a shallower exit is smaller and cheaper than the whole model.
    assert summary["flops"] == sorted(summary["flops"])
    assert all(p < summary["params"][-1] for p in summary["params"][:-1])
    assert all(0.0 <= v <= 100.0 for v in summary["metrics"].values())
    # The per-exit numbers are what the trained weights give, recomputed independently of the metric.
    for name, top1 in _recomputed_top1(tmp_path).items():
        reported = next(v for k, v in summary["metrics"].items() if k.endswith(f"/{name}_top1"))
        assert reported == pytest.approx(top1, abs=1e-3), name


def _recomputed_top1(work_dir: Path) -> dict:
    """Top-1 (%) of every exit and the deepest classifier, recomputed from the saved checkpoint with a plain loop
    over the demo's test images (no mmengine metric, no Runner)."""
    import torch
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmpretrain.registry import DATASETS, MODELS

    import sd_plugin  # noqa: F401  (registers SelfDistillClassifier)

    cfg = Config.fromfile(str(ROOT / "configs" / "demo" / "sd_resnet18-w16_cifar10-mini.py"))
    cfg.model.setdefault("data_preprocessor", cfg.get("data_preprocessor"))  # what the Runner does
    model = MODELS.build(cfg.model).eval()
    state = torch.load(work_dir / "epoch_1.pth", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state, strict=True)
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    correct, total = None, 0
    with torch.no_grad():
        for start in range(0, len(dataset), 100):
            batch = model.data_preprocessor(
                pseudo_collate([dataset[i] for i in range(start, min(start + 100, len(dataset)))])
            )
            _, out = model._forward_all(batch["inputs"])
            labels = torch.cat([s.gt_label for s in batch["data_samples"]])
            hits = torch.stack([(lg.argmax(1) == labels).sum() for lg in [*out.exit_logits, out.logits]])
            correct = hits if correct is None else correct + hits
            total += len(labels)
    names = [f"exit{k}" for k in range(1, len(correct))] + ["deepest"]
    return {name: 100.0 * int(c) / total for name, c in zip(names, correct)}
