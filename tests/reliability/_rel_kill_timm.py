"""``sd-plugin train-timm ARGS`` whose save after epoch ``--stall-at-epoch`` stalls half-way (a test then SIGKILLs it).

Usage: ``python _rel_kill_timm.py MARKER EPOCH -- TRAIN_TIMM_ARGS``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from _rel_helpers import stall_on_next_big_write
from _rel_run import load_tool


def main() -> int:
    marker, epoch = Path(sys.argv[1]), int(sys.argv[2])
    tool = load_tool("train_timm")
    real_save = tool._save

    def save(args: Any, net: Any, optimizer: Any, scheduler: Any, done: int, *rest: Any) -> None:
        if done == epoch:
            last = os.path.join(args.output, "checkpoint-last.pth")
            stall_on_next_big_write(os.path.getsize(last) // 2, marker)
        real_save(args, net, optimizer, scheduler, done, *rest)

    tool._save = save
    return int(tool.main(sys.argv[4:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
