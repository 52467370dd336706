# netra_actors: `make run` serves the demo, `make test` runs the whole suite.
# Each target creates the virtual environment and installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: run test test-thorough lint install clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "netra_actors needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/netra-actors serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# Many more hypothesis examples (property, fuzz and model-based tests only).
test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -m "not network" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check netra_actors tests benchmarks
	$(BIN)/ruff format --check netra_actors
	$(BIN)/mypy --strict netra_actors

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
