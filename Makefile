PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(MAKE) install
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

demo: $(VENV)/.installed
	$(BIN)/python -m ldir_pl.demo

clean:
	rm -rf outputs multirun wandb .pytest_cache
