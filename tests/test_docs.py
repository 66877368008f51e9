"""The docs: the configuration reference must not drift; user docs stay short and free of run history."""

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    """The MkDocs hook that generates docs/configuration.md (docs/hooks/config_reference.py)."""
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_reference"] = module
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    gen = _gen()
    assert (ROOT / "docs" / "configuration.md").read_text() == gen.render(), (
        "docs/configuration.md is out of date: run `python docs/hooks/config_reference.py`"
    )


def test_site_builds_the_configuration_page_from_the_code():
    """mkdocs.yml runs the hook, and the hook replaces that page's markdown (only that page's) with the code's."""
    gen = _gen()
    assert re.search(r"^hooks:\n\s+- docs/hooks/config_reference\.py\b", (ROOT / "mkdocs.yml").read_text(), re.M)

    def page(src_uri):
        return SimpleNamespace(file=SimpleNamespace(src_uri=src_uri))

    assert gen.on_page_markdown("stale", page=page("configuration.md"), config={}, files=None) == gen.render()
    assert gen.on_page_markdown("other", page=page("methods.md"), config={}, files=None) is None


def test_every_shared_option_is_documented():
    gen = _gen()
    from sd_plugin.core import SelfDistillConfig

    rows = gen.options_of(SelfDistillConfig)
    assert [r[0] for r in rows] == list(SelfDistillConfig.option_names())
    assert all(r[3] for r in rows)


def test_an_undocumented_option_fails():
    gen = _gen()

    class Component:
        """A component.

        Args:
            alpha (float): Documented.
        """

        def __init__(self, alpha: float = 1.0, beta: int = 2) -> None:
            pass

    with pytest.raises(ValueError, match="'beta' has no entry"):
        gen.options_of(Component)


def test_args_parser_reads_multiline_entries():
    gen = _gen()
    doc = """Title.

    Args:
        first (int): Line one
            continues here.
        second: Other.

    Returns:
        Nothing.
    """
    assert gen.parse_args_section(doc) == {"first": "Line one continues here.", "second": "Other."}


# The user documentation: short README, no development history, a site page for every topic.
USER_DOCS = ["README.md", "DEVELOPERS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
HISTORY = {
    "a date": r"\b20\d\d-\d\d-\d\d\b",
    "a UTC time": r"\bUTC\b",
    "a commit hash": r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b",
    "session or issue talk": r"\b(?:this|the|earlier|previous) sessions?\b|\bissues? #?\d+\b",
    "a machine-load remark": r"\b(?:machine|cores?) (?:was |were )?(?:loaded|busy|quiet)\b|\bload average\b",
}


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to docs/"


@pytest.mark.parametrize("path", USER_DOCS)
def test_user_docs_carry_no_history(path):
    """Dates, commit hashes and run history belong in the generated result pages (docs/results/), not here."""
    text = (ROOT / path).read_text()
    for what, pattern in HISTORY.items():
        found = re.search(pattern, text, re.I if what != "a commit hash" else 0)
        assert not found, f"{path} has {what}: {found.group(0)!r}"


def test_docs_site_has_a_page_for_every_topic():
    site = (ROOT / "mkdocs.yml").read_text()
    pages = [
        "index",
        "getting-started",
        "mmpretrain",
        "timm",
        "exits",
        "methods",
        "results",
        "coverage",
        "reliability",
        "errors",
        "configuration",
        "design",
        "api",
    ]
    for page in pages:
        assert (ROOT / "docs" / f"{page}.md").is_file(), f"docs/{page}.md is missing"
        assert re.search(rf":\s*{page}\.md\s*$", site, re.M), f"docs/{page}.md is not in mkdocs.yml's nav"
    assert "mkdocstrings" in site and "strict: true" in site
