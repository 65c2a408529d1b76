PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first, from pip's default index unless TORCH_INDEX names another (e.g. a CUDA build:
# make install TORCH_INDEX=https://download.pytorch.org/whl/cu128)
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
# gpu-check installs nothing: it uses .venv when present, else the python on PATH
CHECK_PY := $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)

.PHONY: install test lint demo gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(MAKE) install
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

demo: $(VENV)/.installed
	$(BIN)/python -m ldir_pl.apps.demo

gpu-check:
	$(CHECK_PY) experiments/gpu_check.py --device cuda

clean:
	rm -rf outputs multirun wandb .pytest_cache
