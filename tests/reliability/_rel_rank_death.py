"""A rank that stalls at a chosen training step, for a test to SIGKILL it there (the other ranks go on).

The stalled rank writes its process id to a marker file and sleeps; the test reads the id and sends SIGKILL, so the
death comes at a known step while the other rank trains on into that step's gradient all-reduce.

- MMPretrain route: ``StallRankHook`` (registered here; put ``'_rel_rank_death'`` in ``custom_imports``).
- timm route: ``torchrun ... _rel_rank_death.py MARKER RANK EPOCH STEP -- TRAIN_TIMM_ARGS`` runs
  ``sd-plugin train-timm`` with rank ``RANK`` stalling before step ``STEP`` (1-based) of epoch ``EPOCH`` (1-based).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

STALL_SECONDS = 600


def stall_here(marker: Path) -> None:
    """Write this process's id to ``marker`` (complete or absent: written, then renamed) and sleep."""
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)
    time.sleep(STALL_SECONDS)


@HOOKS.register_module()
class StallRankHook(Hook):
    """Rank ``rank`` stalls before training iteration ``at_iter`` (0-based, counted over the whole run)."""

    def __init__(self, rank: int, at_iter: int, marker: str) -> None:
        self.rank = rank
        self.at_iter = at_iter
        self.marker = Path(marker)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        if runner.iter == self.at_iter and get_rank() == self.rank:
            stall_here(self.marker)


class _StallBefore:
    """Iterates ``loader``; stalls before handing out batch ``step`` (1-based)."""

    def __init__(self, loader: Iterable, step: int, marker: Path) -> None:
        self.loader, self.step, self.marker = loader, step, marker

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader, start=1):
            if i == self.step:
                stall_here(self.marker)
            yield batch


def main() -> int:
    marker, rank, epoch, step = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from _rel_run import load_tool

    tool = load_tool("train_timm")
    real, calls = tool.train_one_epoch, {"n": 0}

    def train_one_epoch(model: Any, loader: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == epoch and int(os.environ.get("RANK", "0")) == rank:
            loader = _StallBefore(loader, step, marker)
        return real(model, loader, *args, **kwargs)

    tool.train_one_epoch = train_one_epoch
    return int(tool.main(sys.argv[6:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
