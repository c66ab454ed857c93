# sdtrt: `make demo` and `make test` work on a fresh machine with Python 3.10+ and a package index.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of PyTorch (the export stage only). Elsewhere, e.g.:
#   make TORCH="torch --index-url https://download.pytorch.org/whl/cpu" demo
TORCH  ?= torch==2.13.0
MODEL  ?= export/assets/tiny-sd
OUT    ?= artifacts/$(notdir $(MODEL))-onnx

.PHONY: setup demo test docs lint format export engines bench serve train-tiny train-tiny-controlnet train-tiny-vae clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[export,cpu,bench,dev,serve,controlnet,browser,docs,quantize]"
	touch $@

demo: setup  ## export the embedded demo model, draw one image on the CPU
	$(VENV)/bin/sdtrt demo

test: setup  ## the CPU test suite (gpu and slow tests are deselected)
	$(PY) -m pytest

docs: setup  ## the documentation site (MkDocs, docs/ and mkdocs.yml) into site/; a broken link fails it
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

export: setup  ## make export MODEL=path/to/diffusers-folder [OUT=artifacts/name-onnx]
	$(VENV)/bin/sdtrt export $(MODEL) --out $(OUT) --precision fp32 fp16 --overwrite

# TensorRT plans for an exported folder (needs an NVIDIA GPU and `pip install -e ".[gpu]"`), e.g.
#   make engines DIR=artifacts/sd15 BUILD="--static 512x512 --batch 1"
DIR   ?= $(OUT)
BUILD ?=
engines: setup  ## make engines DIR=artifacts/name-onnx [BUILD="--static HxW --batch N" | "--dynamic 256-1024"]
	$(VENV)/bin/sdtrt build $(DIR) $(BUILD)

# The demo model over HTTP on http://127.0.0.1:7860 (docs/serving.md); e.g. make serve SERVE="--max-batch 8"
SERVE ?=
serve: setup  ## export the embedded demo model (once), then serve it: make serve [SERVE="--port N ..."]
	$(VENV)/bin/sdtrt demo --quiet
	$(VENV)/bin/sdtrt serve artifacts/tiny-sd-onnx $(SERVE)

# Retrain the embedded demo model (an hour or more on one CPU core; see docs/demo-model.md), then its
# ControlNet (make train-tiny-controlnet), which fits one base model's weights.
train-tiny: setup
	$(PY) -m train.tiny --out export/assets/tiny-sd --overwrite

# Retrain the demo model's tiny ControlNet (semantic maps) and its example maps (docs/demo-model.md).
train-tiny-controlnet: setup
	$(PY) -m train.controlnet --out export/assets/tiny-controlnet --maps export/assets/maps --overwrite

# Distil the demo model's tiny VAE (an AutoencoderTiny for `sdtrt demo --tiny-vae`) from its VAE (docs/demo-model.md).
train-tiny-vae: setup
	$(PY) -m train.tiny_vae --out export/assets/tiny-vae --overwrite

# sdtrt's backends beside diffusers in one run (docs/benchmarks.md): JSONL rows, a markdown table and a PNG
# under benchmarks/results/. With a GPU: SD-1.5-shaped, 512x512, every GPU backend and peer; without one:
# 256x256 on OpenVINO (bf16), ORT CPU and diffusers fp32 and bf16 on the CPU, one thread each, side by side
# taking turns step by step (~17 GiB together; add openvino-fp32 where ~22 GiB are free, or measure it with
# --no-interleave). Anything else, e.g. make bench BENCH="--model sd15 --sweep".
ifneq ($(shell command -v nvidia-smi 2>/dev/null),)
BENCH ?= --model sd15 --height 512 --width 512 --batch 2 --steps 30 --out benchmarks/results/gpu.jsonl
else
BENCH ?= --model sd15 --backend openvino ort-cpu torch torch-bf16 --height 256 --width 256 --batch 2 --steps 10 \
	--threads 1 --warmup 2 --out benchmarks/results/cpu.jsonl
endif
bench: setup  ## make bench [BENCH="--model sd15|sdxl|tiny|DIR --backend ... --sweep"]; then the serving row
	$(PY) -m benchmarks.run $(BENCH)
	$(PY) -m benchmarks.run --serving

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
