"""The configuration reference is generated from the code and must not drift."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    gen = _gen()
    assert (ROOT / "docs" / "configuration.md").read_text() == gen.render(), (
        "docs/configuration.md is out of date: run `python tools/gen_config_docs.py`"
    )


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
