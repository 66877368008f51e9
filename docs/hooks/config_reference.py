"""MkDocs hook: the configuration reference (docs/configuration.md), generated from the code so it cannot drift.

Every documented component's options come from its signature (name, type,
default) and the ``Args:`` section of its docstring (meaning and the source of
the default). ``mkdocs build`` renders the page from the code (``on_page_markdown``),
whatever the committed copy says; the committed copy is for reading the docs in the
repository, and ``tests/test_docs.py`` fails when it differs from what the code gives
or when an option has no entry in its docstring.

Usage:
    python docs/hooks/config_reference.py            # rewrite docs/configuration.md
    python docs/hooks/config_reference.py --check    # fail on drift
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

#: The page this hook generates, relative to docs_dir, and its committed copy.
PAGE = "configuration.md"
DOC_PATH = Path(__file__).resolve().parents[1] / PAGE

# (section title, "module:attribute", how users reach it)
COMPONENTS: List[Tuple[str, str, str]] = [
    (
        "Self-distillation options",
        "sd_plugin.core.config:SelfDistillConfig",
        "Shared by both routes: keyword options of `sd_plugin.wrap(...)`, `sd_plugin.SelfDistillLoss(...)` and "
        "`model=dict(type='SelfDistillClassifier', ...)`.",
    ),
    ("`sd_plugin.wrap` (timm)", "sd_plugin.timm_adapter:wrap", "Options besides the self-distillation options above."),
    (
        "`SelfDistillLoss` (timm loop)",
        "sd_plugin.core.losses:SelfDistillLoss",
        "Options besides the self-distillation options above.",
    ),
    (
        "`SelfDistillClassifier` (MMPretrain model)",
        "sd_plugin.mmpretrain_adapter:SelfDistillClassifier",
        "Options besides the self-distillation options above and those of mmpretrain's `ImageClassifier`.",
    ),
    (
        "`SelfDistillLoss` (MMPretrain loss module)",
        "sd_plugin.mmpretrain_adapter:SelfDistillLoss",
        "Registered in MMPretrain's MODELS; returns the named terms as a dict for mmengine's logger.",
    ),
    ("`SelfDistillExitNeck` (MMPretrain neck)", "sd_plugin.mmpretrain_adapter:SelfDistillExitNeck", ""),
    ("`DistillWeightWarmupHook` (MMPretrain hook)", "sd_plugin.mmpretrain_adapter:DistillWeightWarmupHook", ""),
    ("`SaveStrippedCheckpointHook` (MMPretrain hook)", "sd_plugin.mmpretrain_adapter:SaveStrippedCheckpointHook", ""),
    (
        "`RNGStateHook` (MMPretrain hook)",
        "sd_plugin.mmpretrain_adapter.rng_state_hook:RNGStateHook",
        "Added by `sd-plugin train` unless `--no-rng-state-hook`.",
    ),
    ("`MultiExitAccuracy` (MMPretrain metric)", "sd_plugin.mmpretrain_adapter:MultiExitAccuracy", ""),
    (
        "`MultiExitAveragePrecision` (MMPretrain metric, multi-label heads)",
        "sd_plugin.mmpretrain_adapter:MultiExitAveragePrecision",
        "",
    ),
]

# Parameters documented elsewhere (the shared options) or not user options.
SKIP = {
    "self",
    "args",
    "kwargs",
    "options",
    "init_cfg",
    "data_preprocessor",
    "backbone",
    "neck",
    "head",
    "pretrained",
    "train_cfg",
    "collect_device",
    "prefix",
}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def parse_args_section(doc: str) -> Dict[str, str]:
    """Google-style ``Args:`` entries of a docstring: name -> one-line meaning."""
    entries: Dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    in_args, current, indent = False, None, None
    for line in lines:
        if re.match(r"^(Args|Arguments|Attributes):\s*$", line.strip()) and not line.startswith(" "):
            in_args, current, indent = True, None, None
            continue
        if in_args:
            if line and not line.startswith(" "):
                in_args = False
                continue
            m = re.match(r"^(\s+)(\*{0,2}\w+)(\s*\([^)]*\))?:\s*(.*)$", line)
            if m and (indent is None or len(m.group(1)) == indent):
                indent = len(m.group(1))
                current = m.group(2).lstrip("*")
                entries[current] = m.group(4).strip()
            elif current and line.strip():
                entries[current] += " " + line.strip()
    return entries


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return text.replace("typing.", "")


def options_of(obj: Any) -> List[Tuple[str, str, str, str]]:
    """(name, type, default, meaning) for every user option of ``obj``."""
    doc = parse_args_section(obj.__doc__ or "")
    if dataclasses.is_dataclass(obj):
        params = [(f.name, f.type, f.default) for f in dataclasses.fields(obj) if f.init]
    else:
        target = obj.__init__ if inspect.isclass(obj) else obj
        sig = inspect.signature(target)
        params = [
            (p.name, p.annotation, p.default)
            for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if inspect.isclass(obj):
            doc = {**parse_args_section(obj.__init__.__doc__ or ""), **doc}
    rows = []
    for name, annotation, default in params:
        if name in SKIP:
            continue
        if name not in doc:
            raise ValueError(f"{obj.__qualname__}: option {name!r} has no entry in the docstring's Args section.")
        shown = "required" if default in (inspect.Parameter.empty, dataclasses.MISSING) else f"`{default!r}`"
        rows.append((name, _type_name(annotation), shown, doc[name]))
    return rows


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the code by `docs/hooks/config_reference.py`; `tests/test_docs.py` fails when it drifts.",
        "Each default's source is given in its meaning (BYOT = Zhang et al., ICCV 2019).",
        "",
    ]
    for title, target, note in COMPONENTS:
        obj = _load(target)
        out += [f"## {title}", ""]
        if note:
            out += [note, ""]
        out += ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, typ, default, meaning in options_of(obj):
            cell = meaning.replace("|", "\\|")
            out.append(f"| `{name}` | `{typ}` | {default} | {cell} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> Optional[str]:
    """MkDocs hook: the configuration page's markdown is the one the code gives; other pages pass unchanged."""
    if page.file.src_uri != PAGE:
        return None
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops; mmpretrain's import says so, which is no news for this page.
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention", category=UserWarning)
        return render()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/configuration.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date: run `python docs/hooks/config_reference.py`.", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date.")
        return 0
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
