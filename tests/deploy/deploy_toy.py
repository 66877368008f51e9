"""A tiny three-stage CNN with two exits that implements ``sd_plugin.core.MultiExitModel``."""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.nn as nn

from sd_plugin.core import ExitPoint, build_exit
from sd_plugin.core.engine import ExitEngine


class CountingStage(nn.Module):
    """A conv stage that records the batch size of every call (the tests' independent observer)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.calls: List[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return torch.relu(self.bn(self.conv(x)))


class ToyNet(nn.Module):
    """The user's plain model: stem, three stages, pooled linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList([CountingStage(8, 8, 1), CountingStage(8, 16, 2), CountingStage(16, 32, 2)])
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean(dim=(2, 3)))


class ToyMultiExit(nn.Module):
    """``ToyNet`` with exits after stages 0 and 1."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.net = ToyNet(num_classes)
        self.points = [ExitPoint("stages.0", "NCHW", 8, stride=4), ExitPoint("stages.1", "NCHW", 16, stride=2)]
        self.exits = nn.ModuleList(build_exit(p.fmt, p.channels, 32, p.stride) for p in self.points)
        self.exit_heads = nn.ModuleList(nn.Linear(32, num_classes) for _ in self.points)
        self.exit_engine = ExitEngine(self.net, self.points)

    @property
    def exit_points(self) -> Sequence[ExitPoint]:
        return self.points

    @property
    def num_exits(self) -> int:
        return len(self.points)

    def tapped_module(self) -> nn.Module:
        return self.net

    def forward_deepest(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def forward_exit(self, k: int, feature: torch.Tensor) -> torch.Tensor:
        return self.exit_heads[k](self.exits[k](feature))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.forward_deepest(inputs)

    def reset_calls(self) -> None:
        for stage in self.net.stages:
            if isinstance(stage, CountingStage):
                stage.calls.clear()


def toy(seed: int = 0) -> ToyMultiExit:
    torch.manual_seed(seed)
    model = ToyMultiExit()
    # Non-trivial batch-norm statistics so that eval mode differs from identity.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model.net(torch.randn(8, 3, 16, 16))
    return model.eval()


def all_exit_logits(model: ToyMultiExit, x: torch.Tensor) -> List[torch.Tensor]:
    """Every exit's logits then the deepest, computed the slow, obvious way (no hooks)."""
    net = model.net
    h = net.stem(x)
    feats = []
    for stage in net.stages:
        h = stage(h)
        feats.append(h)
    return [model.forward_exit(0, feats[0]), model.forward_exit(1, feats[1]), net.fc(h.mean(dim=(2, 3)))]


def check_truncation_and_early_exit(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Check a real adapter model against its own per-exit logits; return each sample's expected exit.

    Every truncated model equals that exit's logits; with per-exit thresholds at the median
    confidence, ``EarlyExitModel`` answers each sample at the first exit whose max-prob clears
    its threshold, with that exit's logits.
    """
    from sd_plugin.deploy import EarlyExitModel, collect_exit_logits, truncate

    n = x.shape[0]
    num_exits = model.num_exits  # type: ignore[attr-defined]
    ref = collect_exit_logits(model, [(x, torch.zeros(n, dtype=torch.long))]).logits
    for k in range(num_exits + 1):
        torch.testing.assert_close(truncate(model, exit=k + 1, example_input=x[:1])(x), ref[k], rtol=1e-4, atol=1e-5)
    probs = ref[:-1].softmax(-1).max(-1).values
    thresholds = [float(p.quantile(0.5)) for p in probs]
    # Count the samples entering every exit point's stage with hooks of our own, independently of the
    # EarlyExitModel's bookkeeping.
    from sd_plugin.core import get_submodule

    entered = [0] * num_exits
    handles = [
        get_submodule(model.tapped_module(), p.module).register_forward_hook(  # type: ignore[operator]
            lambda m, args, out, k=k: entered.__setitem__(k, entered[k] + args[0].shape[0])
        )
        for k, p in enumerate(model.exit_points)  # type: ignore[attr-defined]
    ]
    try:
        out = EarlyExitModel(model, thresholds).eval()(x)
    finally:
        for h in handles:
            h.remove()
    expected = torch.full((n,), num_exits)
    for k in reversed(range(num_exits)):
        expected = torch.where(probs[k] >= thresholds[k], k, expected)
    assert torch.equal(out.exit, expected + 1)
    torch.testing.assert_close(out.logits, ref[expected, torch.arange(n)], rtol=1e-4, atol=1e-5)
    remaining = [n - int((expected < k).sum()) for k in range(num_exits + 1)]
    assert out.samples_per_stage == remaining
    # The stages really ran on only the samples still undecided; after a point that cannot hand on fewer samples
    # (ExitPoint.shrinkable False) the batch stays as it was at the last point that could.
    batch, ran = n, []
    for k, p in enumerate(model.exit_points):  # type: ignore[attr-defined]
        ran.append(batch if remaining[k] else 0)
        if getattr(p, "shrinkable", True):
            batch = remaining[k + 1]
    assert entered == ran
    return expected


def nudged_wrap(make: Callable[[], nn.Module], scale: float = 0.2, batch: int = 8, seed: int = 0) -> nn.Module:
    """``sd_plugin.wrap(make())`` with exit weights nudged apart by ``scale`` (untrained exits answer alike) and
    BatchNorm statistics that saw one training batch of ``batch`` images; in eval mode."""
    import sd_plugin

    torch.manual_seed(seed)
    model = sd_plugin.wrap(make(), input_size=(3, 32, 32))
    with torch.no_grad():
        for p in model.sd_exits.parameters():
            p.add_(scale * torch.randn_like(p))
        model.train()
        model(torch.randn(batch, 3, 32, 32))
    return model.eval()


def wrapped_test_resnet(num_classes: int = 6, seed: int = 0) -> nn.Module:
    """timm's ``test_resnet`` through :func:`nudged_wrap`."""
    import timm

    return nudged_wrap(lambda: timm.create_model("test_resnet", num_classes=num_classes), seed=seed)
