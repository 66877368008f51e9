# Front door: `make demo` sets up and trains the demo; `make test` sets up and runs every check CI runs.
# `make docs` builds the documentation site into site/ (strict: a broken link or reference fails).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PINS := torch==2.14.1 torchvision==0.29.1 setuptools==80.10.2 timm==1.0.31 mmengine==0.10.7 mmcv-lite==2.2.0 mmpretrain==1.2.0

.PHONY: setup demo lint docs test test-fast clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(PINS)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[timm,mmpretrain,export,analysis,dev]" $(PINS)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python examples/quickstart.py

lint: setup
	$(BIN)/ruff check sd_plugin tools tests examples docs/hooks
	$(BIN)/ruff format --check sd_plugin tools tests examples docs/hooks
	$(BIN)/mypy

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build dist *.egg-info work_dirs site
