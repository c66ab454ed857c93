# sdtrt: `make demo` and `make test` work on a fresh machine with Python 3.10+ and a package index.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of PyTorch (the export stage only). Elsewhere, e.g.:
#   make TORCH="torch --index-url https://download.pytorch.org/whl/cpu" demo
TORCH  ?= torch==2.13.0
MODEL  ?= artifacts/tiny-sd1
OUT    ?= artifacts/$(notdir $(MODEL))-onnx

.PHONY: setup demo test lint format export engines bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[export,cpu,bench,dev]"
	touch $@

demo: setup  ## build + export the tiny model, draw one image on the CPU
	$(VENV)/bin/sdtrt demo

test: setup  ## the CPU test suite (gpu and slow tests are deselected)
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

export: setup  ## make export MODEL=path/to/diffusers-folder [OUT=artifacts/name-onnx]
	$(VENV)/bin/sdtrt export $(MODEL) --out $(OUT) --precision fp32 fp16 --overwrite

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
