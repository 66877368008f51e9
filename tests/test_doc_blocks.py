"""Every code block of README.md and docs/getting-started.md runs, as it stands in the file.

The blocks are read from the files at test time (never copied here), so an example cannot go stale.

How a block is treated, from its fence language and an optional HTML comment on the line right before it:

- ```python: run as a script (a fresh interpreter, this venv, in a temporary folder that holds links to
  ``demo_data/`` and ``configs/``). It must pass without downloads and in a few seconds: small models, random
  tensors or the bundled images.
- ``<!-- mmengine-config -->`` before a ```python block: a config fragment. It is written to ``config.py``, loaded
  with mmengine's ``Config.fromfile``, and the components it names are built from the registries: ``model``,
  ``val_evaluator`` / ``test_evaluator`` and every ``custom_hooks`` entry. sd_plugin is not imported first: the
  fragment must work as a user's config would.
- ```bash / ```sh / ```shell: run with ``bash -euo pipefail`` in the same temporary folder.
- ``<!-- not-run: REASON -->`` before a shell block: not run (long jobs such as training or ``make test``, and
  installs that need the network). The reason is required, and Python blocks cannot be skipped this way.
- ```text (output samples) and ```bibtex (citations): never run.

Any other fence (no language, an unknown one, an unknown marker) fails ``test_every_block_is_classified``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ("README.md", "docs/getting-started.md")
RUN_LANGS = {"python", "bash", "sh", "shell"}
NEVER_RUN_LANGS = {"text", "bibtex"}
MARKER = re.compile(r"^<!--\s*(?P<kind>[a-z-]+)(?::\s*(?P<reason>.*?))?\s*-->$")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    file: str
    line: int  # 1-based line of the opening fence
    lang: str
    marker: Optional[str]
    reason: Optional[str]
    code: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def extract_blocks(text: str, file: str) -> List[Block]:
    """Fenced blocks (``` at the start of a line, any indent) with their language and the marker above them."""
    blocks: List[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        start = i
        body: List[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[i]):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{file}:{start + 1}: unclosed code fence")
        i += 1
        marker = reason = None
        above = lines[start - 1].strip() if start > 0 else ""
        found = MARKER.match(above)
        if found:
            marker, reason = found.group("kind"), found.group("reason")
        blocks.append(Block(file, start + 1, lang.lower(), marker, reason, "\n".join(body) + "\n"))
    return blocks


def all_blocks() -> List[Block]:
    return [b for f in FILES for b in extract_blocks((ROOT / f).read_text(), f)]


def to_run() -> List[Block]:
    seen = set()
    out = []
    for b in all_blocks():
        if b.lang in RUN_LANGS and b.marker != "not-run" and (b.code, b.marker) not in seen:
            seen.add((b.code, b.marker))  # a block shown in both files runs once
            out.append(b)
    return out


# Loads a config fragment the way a user's tools would: no sd_plugin import beforehand.
CONFIG_CHECK = """
import sys
from mmengine.config import Config
from mmengine.registry import init_default_scope
cfg = Config.fromfile(sys.argv[1])
init_default_scope(cfg.get('default_scope', 'mmpretrain'))
from mmpretrain.registry import HOOKS, METRICS, MODELS
built = []
if 'model' in cfg:
    built.append(type(MODELS.build(cfg.model)).__name__)
for key in ('val_evaluator', 'test_evaluator'):
    for metric in (cfg[key] if isinstance(cfg.get(key), list) else [cfg[key]]) if key in cfg else []:
        built.append(type(METRICS.build(metric)).__name__)
for hook in cfg.get('custom_hooks', []):
    built.append(type(HOOKS.build(hook)).__name__)
assert built, 'the config fragment names no model, evaluator or hook to build'
print('built', built)
"""


def test_every_block_is_classified():
    blocks = all_blocks()
    assert blocks, "no code blocks found"
    for b in blocks:
        assert b.lang, f"{b.id}: give the fence a language (```python, ```bash, ```text ...)"
        assert b.lang in RUN_LANGS | NEVER_RUN_LANGS, f"{b.id}: unknown fence language {b.lang!r}"
        assert b.marker in (None, "not-run", "mmengine-config"), f"{b.id}: unknown marker {b.marker!r}"
        if b.marker == "not-run":
            assert b.lang in {"bash", "sh", "shell"}, f"{b.id}: only shell blocks may be not-run; make it runnable"
            assert b.reason, f"{b.id}: <!-- not-run: REASON --> needs a reason"
        if b.marker == "mmengine-config":
            assert b.lang == "python", f"{b.id}: a config fragment is a ```python block"
    skipped = [b.id for b in blocks if b.marker == "not-run"]
    assert len(skipped) <= 6, f"keep not-run blocks few: {skipped}"


def test_extractor_reads_markers_and_indented_fences():
    text = textwrap.dedent(
        """\
        <!-- not-run: trains for hours -->
        ```bash
        make demo
        ```
        - item:

          ```python
          print(1)
          ```
        """
    )
    first, second = extract_blocks(text, "x.md")
    assert (first.lang, first.marker, first.reason) == ("bash", "not-run", "trains for hours")
    assert first.code == "make demo\n"
    assert (second.lang, second.marker, second.code) == ("python", None, "print(1)\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("doc_blocks")
    for name in ("demo_data", "configs"):
        (path / name).symlink_to(ROOT / name)
    return path


@pytest.mark.slow  # a fresh interpreter per block: 5-20 s each
@pytest.mark.parametrize("block", to_run(), ids=lambda b: b.id)
def test_block_runs(block, workdir):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "2")
    if block.marker == "mmengine-config":
        config = workdir / f"config_{block.file.replace('/', '_')}_{block.line}.py"
        config.write_text(block.code)
        cmd = [sys.executable, "-c", CONFIG_CHECK, str(config)]
    elif block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    run = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = run.stdout[-2000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"{block.id} failed:\n{block.code}\n--- output ---\n{output}"
