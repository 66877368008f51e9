"""Lint rule: the package and its tools read files as data only.

Fails when code outside ``tests/`` calls ``torch.load`` without ``weights_only=True``, unpickles with ``pickle``
/ ``dill`` / ``numpy.load(allow_pickle=True)`` / ``yaml.load`` without a safe loader, or widens torch's
``weights_only`` allow-list outside the one scoped place (``sd_plugin/_safe_globals.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("sd_plugin", "tools", "configs", "examples", "docs/hooks")
SCOPED_ALLOW_LIST_HOME = Path("sd_plugin/_safe_globals.py")
ALLOW_LIST_CALLS = {"add_safe_globals", "safe_globals"}
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("dill", "loads"), ("marshal", "loads")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems_in(source: str, rel: Path) -> Iterator[str]:
    """Every unsafe load in one file's source, as 'path:line: what'."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.split("."))
        where = f"{rel}:{node.lineno}"
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            yield f"{where}: torch.load without weights_only=True"
        elif parts[-2:] in UNPICKLERS:
            yield f"{where}: {name} unpickles arbitrary objects"
        elif parts[-2:] == ("np", "load") or parts[-2:] == ("numpy", "load"):
            if _is_true(_keyword(node, "allow_pickle")):
                yield f"{where}: {name}(allow_pickle=True)"
        elif parts[-2:] == ("yaml", "load") and "Safe" not in _dotted(_keyword(node, "Loader") or ast.Constant(0)):
            yield f"{where}: yaml.load without a SafeLoader"
        elif parts[-1] in ALLOW_LIST_CALLS and rel != SCOPED_ALLOW_LIST_HOME:
            yield f"{where}: {name} widens torch's allow-list outside {SCOPED_ALLOW_LIST_HOME}"


def _sources() -> Iterator[Tuple[Path, str]]:
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT), path.read_text()


def test_no_unsafe_load_outside_tests():
    found: List[str] = [p for rel, src in _sources() for p in problems_in(src, rel)]
    assert not found, "files must be read as data:\n" + "\n".join(found)


def test_the_rule_catches_each_kind_of_unsafe_load():
    """The checker itself can fail: each pattern it must reject is rejected, the safe forms pass."""
    bad = {
        "torch.load(p)": "without weights_only=True",
        "torch.load(p, weights_only=False)": "without weights_only=True",
        "pickle.load(f)": "unpickles",
        "np.load(p, allow_pickle=True)": "allow_pickle",
        "yaml.load(s)": "SafeLoader",
        "torch.serialization.add_safe_globals([getattr])": "allow-list",
        "with torch.serialization.safe_globals([getattr]):\n    pass": "allow-list",
    }
    for src, why in bad.items():
        (msg,) = problems_in(src, Path("sd_plugin/x.py"))
        assert why in msg, (src, msg)
    good = "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\nyaml.load(s, Loader=yaml.SafeLoader)"
    assert not list(problems_in(good, Path("sd_plugin/x.py")))
    assert not list(problems_in("torch.serialization.add_safe_globals([x])", SCOPED_ALLOW_LIST_HOME))
