"""Provenance of a generated results page (the CLI report, the repository's research tools): command, versions,
hardware, date, stated once at the top of the page."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from typing import Dict, Optional, Sequence

import torch

__all__ = ["command_line", "environment", "provenance"]

#: Packages whose versions a results page states when they are installed.
REPORTED_PACKAGES = ("torch", "timm", "mmengine", "mmpretrain", "onnxruntime")


def command_line(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """``python -m MODULE ARGS`` as the user would type it."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = [f"Python {platform.python_version()}"]
    for name in REPORTED_PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def environment() -> Dict[str, str]:
    """Versions, hardware and today's date (UTC), as a results page states them."""
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {
        "versions": _versions(),
        "hardware": f"{cpu}, {os.cpu_count()} CPU cores, {device}, torch threads {torch.get_num_threads()}",
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d}",
    }


def provenance(command: str, env: Optional[Dict[str, str]] = None) -> str:
    """``Command: ... Versions: ... Hardware: ... Date: ...`` for the top of a generated page."""
    env = env or environment()
    return f"Command: `{command}`. Versions: {env['versions']}. Hardware: {env['hardware']}. Date: {env['date']}."
