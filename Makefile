# netra_actors: `make run` serves the demo, `make test` runs the whole suite.
# Each target creates the virtual environment and installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: run test test-thorough lint install clean bench bench-full docs

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "netra_actors needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,lint,docs,bench]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The benchmark's extras (websockets, matplotlib) on top; `make test` does not need them.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,lint,docs,bench]'
	rm -f $(VENV)/.bench-installed-*
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(BIN)/netra-actors serve $(ARGS)

# The browser tests need Debian's chromium, the chat client's tmux test tmux: installed here when missing
# (as root), or a message saying what to install.
test: $(STAMP)
	scripts/ensure-test-tools
	$(BIN)/python -m pytest $(ARGS)

# Many more hypothesis examples (property, fuzz and model-based tests only).
test-thorough: $(STAMP)
	scripts/ensure-test-tools
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -m "not network" $(ARGS)

# End-to-end benchmark (issue 7): netra beside its baselines, same run, same machine.
# Figures in benchmarks/results/latest.{json,md}, charts in docs/bench/ (bench-full:
# benchmarks/results/full.{json,md}, docs/bench/full/).
# bench: the quick profile (a few minutes on 2 cores); bench-full: everything.
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_e2e.py --profile quick $(ARGS)

bench-full: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_e2e.py --profile full $(ARGS)

# The documentation site (mkdocs, strict): built into site/.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check netra_actors tests benchmarks
	$(BIN)/ruff format --check netra_actors
	$(BIN)/mypy --strict netra_actors

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
