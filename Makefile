# Lethe: `make train` and `make test` set themselves up (a .venv in this directory).
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=
COMPARE_DIR := logs/compare/$(shell date +%Y-%m-%d_%H-%M-%S)

.DEFAULT_GOAL := help
.PHONY: help install kernels train test test-gpu eval generate export import compare sweep bench bench-generate clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  pass Hydra overrides with ARGS=\"model=transformer-tiny optim.lr=1e-3\""

install: $(STAMP) ## create .venv and install lethe with its dev extra (quick when nothing changed)

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

kernels: install ## build the fused scan kernels for this machine now (otherwise built on first use)
	$(PYTHON) -m lethe.ops.scan_kernels

train: install ## train mamba-tiny on the embedded corpus (a few minutes on 2 CPU cores)
	$(PYTHON) train.py $(ARGS)

test: install ## run the test suite (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-gpu: install ## run only the tests that need a CUDA GPU
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

eval: install ## score a checkpoint: make eval ARGS="ckpt=logs/train/runs/<run>/checkpoints/best.ckpt"
	$(PYTHON) eval.py $(ARGS)

generate: install ## sample text: make generate ARGS="ckpt=<run>/checkpoints/best.ckpt max_new_tokens=300"
	$(PYTHON) generate.py $(ARGS)

export: install ## Lethe checkpoint -> transformers dir: make export CKPT=<run>/checkpoints/best.ckpt OUT=hf/<name>
	$(PYTHON) -m lethe.interop export $(CKPT) $(OUT) $(ARGS)

import: install ## transformers dir -> Lethe checkpoint: make import HF=<local model dir> OUT=<file.ckpt>
	$(PYTHON) -m lethe.interop import $(HF) $(OUT) $(ARGS)

compare: install ## train mamba-tiny and the parameter-matched transformer-tiny, print both side by side
	$(PYTHON) train.py -m model=mamba-tiny,transformer-tiny task_name=compare hydra.sweep.dir=$(COMPARE_DIR) $(ARGS)
	$(PYTHON) eval.py runs=$(COMPARE_DIR)

sweep: install ## a learning-rate sweep over both tiny models (Hydra multirun)
	$(PYTHON) train.py -m optim.lr=1e-3,3e-3 model=mamba-tiny,transformer-tiny task_name=sweep $(ARGS)

bench: install ## scan speed and memory: fused kernels, chunked and the sequential reference side by side
	$(PYTHON) bench/scan.py $(ARGS)

bench-generate: install ## decoding speed and memory: Mamba's state vs the Transformer's KV cache
	$(PYTHON) bench/generate.py $(ARGS)

clean: ## remove caches (tokenized data, __pycache__, pytest); keeps runs in logs/
	find data -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
	rm -rf .pytest_cache src/*.egg-info kernels/build

distclean: clean ## also remove .venv and logs/
	rm -rf $(VENV) logs
