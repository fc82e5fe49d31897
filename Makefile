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
	$(PYTHON) -c 'from lethe.ops.scan_kernels import main; main()'

train: install ## train mamba-tiny on the embedded corpus (a few minutes on 2 CPU cores)
	$(PYTHON) train.py $(ARGS)

test: install ## run the test suite (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-gpu: install ## run only the tests that need a CUDA GPU
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

eval: install ## score checkpoints + context-length sweep: make eval ARGS="ckpt=<.ckpt | run or sweep dir>"
	$(PYTHON) eval.py $(ARGS)

generate: install ## sample text: make generate ARGS="ckpt=<run>/checkpoints/best.ckpt max_new_tokens=300"
	$(PYTHON) generate.py $(ARGS)

export: install ## Lethe checkpoint -> transformers dir: make export CKPT=<run>/checkpoints/best.ckpt OUT=hf/<name>
	$(PYTHON) -m lethe.interop export $(CKPT) $(OUT) $(ARGS)

import: install ## transformers dir -> Lethe checkpoint: make import HF=<local model dir> OUT=<file.ckpt>
	$(PYTHON) -m lethe.interop import $(HF) $(OUT) $(ARGS)

compare: install ## mamba-tiny vs its parameter-matched Transformer++ (same data order and budget), then eval.py on both (~6 min on 2 CPU cores)
	$(PYTHON) train.py -m model=mamba-tiny baseline=none,matched task_name=compare hydra.sweep.dir=$(COMPARE_DIR) $(ARGS)
	$(PYTHON) eval.py ckpt=$(COMPARE_DIR) max_tokens=262144 out_dir=$(COMPARE_DIR)/eval

sweep: install ## a learning-rate sweep over both tiny models (Hydra multirun), then its report
	$(PYTHON) train.py -m optim.lr=1e-3,3e-3 model=mamba-tiny,transformer-tiny task_name=sweep hydra.sweep.dir=$(EXP_DIR)-sweep $(ARGS)
	$(PYTHON) eval.py sweep=$(EXP_DIR)-sweep out_dir=$(EXP_DIR)-sweep/report

hparams: install ## an Optuna search over the learning rate (hparams_search=lr), then its report
	$(PYTHON) train.py -m hparams_search=lr hydra.sweep.dir=$(EXP_DIR)-optuna $(ARGS)
	$(PYTHON) eval.py sweep=$(EXP_DIR)-optuna out_dir=$(EXP_DIR)-optuna/report

report: install ## table + plots of a sweep: make report SWEEP=<sweep dir>
	$(PYTHON) eval.py sweep=$(SWEEP) $(ARGS)

ablation: install ## selective copying with each of delta/B/C input-dependent, all, none (paper Tables 1 and 7; ~10 min)
	$(PYTHON) train.py -m experiment=selective-copying hydra.sweep.dir=$(EXP_DIR)-ablation $(ARGS) \
	  "model.selective={delta:true,B:true,C:true},{delta:false,B:false,C:false},{delta:true,B:false,C:false},{delta:false,B:true,C:false},{delta:false,B:false,C:true}"
	$(PYTHON) eval.py sweep=$(EXP_DIR)-ablation out_dir=$(EXP_DIR)-ablation/report

induction: install ## induction heads: 2-layer Mamba vs Transformer++ trained at length 32, scored up to 4096 (~15 min)
	$(PYTHON) train.py experiment=induction-heads hydra.run.dir=$(EXP_DIR)-induction/mamba $(ARGS)
	$(PYTHON) train.py experiment=induction-heads model=transformer-tiny model.d_ff=128 hydra.run.dir=$(EXP_DIR)-induction/transformer $(ARGS)
	$(PYTHON) eval.py ckpt=$(EXP_DIR)-induction 'lengths=[1,2,8,32,128]' max_tokens=131072 out_dir=$(EXP_DIR)-induction/eval

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
