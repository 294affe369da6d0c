# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the dependency list (or this Makefile) changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile scripts/install.sh | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo demo-seeds test test-unit test-slow bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install.sh
	@PY=$(PY) VENV=$(VENV) bash scripts/install.sh
	@rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/llmdistill demo --config configs/demo.yaml

demo-seeds: install
	$(BIN)/llmdistill demo --config configs/demo.yaml --seeds 0,1,2,3,4 --output_dir runs/demo-seeds

test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m "unit" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench.py --output runs/bench/bench.json

lint: install
	$(BIN)/ruff check llmdistill scripts tests

clean:
	rm -rf runs .pytest_cache
