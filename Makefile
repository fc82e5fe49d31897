# Lethe: `make train` and `make test` set themselves up (a .venv in this directory).
# How long each target takes is measured once, in the README; this file does not repeat it.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
# the model `make compare` pairs with its parameter-matched Transformer++ (any model option: mamba2-tiny, ...)
MODEL ?= mamba-tiny
PYTEST_ARGS ?=
# pytest-xdist workers: the suite's end-to-end runs mostly wait on process start-up, so two beat one on 2 cores
PYTEST_WORKERS ?= 2
NOW := $(shell date +%Y-%m-%d_%H-%M-%S)
# each experiment target writes below logs/<target>/<time>/ (make compare: logs/compare/<time>/)
EXP_DIR = logs/$@/$(NOW)
# a sweep's report is written even when some of its jobs failed; the target then exits with the
# sweep's status (train.py -m exits 3 when a job failed), else with the report's
AND_THEN = ; sweep_status=$$?;
REPORT_STATUS = || exit $$?; exit $$sweep_status
# one line naming the make variable a target needs: $(call need,VAR,example)
need = @test -n "$($(1))" || { echo "error: make $@ needs $(1)=<$(2)>, e.g. make $@ $(1)=$(3)" >&2; exit 2; }

.DEFAULT_GOAL := help
.PHONY: help install kernels train test test-fast test-gpu gpu-check gpu-wheels lint eval generate export import \
        compare zoo sweep hparams report ablation induction synthetic bench bench-train bench-generate clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  pass Hydra overrides with ARGS=\"model=transformer-tiny optim.lr=1e-3\""

install: $(STAMP) ## create .venv and install lethe with its dev, bench and eval extras (quick when nothing changed)

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev,bench,eval]"
	@$(PYTHON) -c "import matplotlib.font_manager"  # matplotlib's one-time font cache, here rather than mid-run
	@touch $(STAMP)

kernels: install ## build the fused scan kernels for this machine now (otherwise built on first use)
	$(PYTHON) -m lethe.ops.kernel_build

train: install ## train mamba-tiny on the embedded corpus
	$(PYTHON) train.py $(ARGS)

test: install ## run the whole test suite
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install ## the suite without the slow end-to-end runs, for the edit-test loop
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

test-gpu: install ## run only the tests that need a CUDA GPU
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

gpu-check: ## on a CUDA machine: kernel build, GPU tests, GPU benchmarks -> bench/results/ (bench/gpu_check.sh)
	bash bench/gpu_check.sh

gpu-wheels: install ## download the wheels a bare GPU machine lacks into .whl/ (bench/gpu_check.sh installs them)
	bash bench/gpu_check.sh --download-wheels

lint: install ## ruff: pyflakes rules, import order, line length (pyproject.toml [tool.ruff])
	$(PYTHON) -m ruff check .

eval: install ## score checkpoints + context-length sweep: make eval ARGS="ckpt=<.ckpt | run or sweep dir>"
	$(PYTHON) eval.py $(ARGS)

generate: install ## sample text: make generate ARGS="ckpt=<run>/checkpoints/best.ckpt max_new_tokens=300"
	$(PYTHON) generate.py $(ARGS)

export: install ## Lethe checkpoint -> transformers dir: make export CKPT=<run>/checkpoints/best.ckpt OUT=hf/<name>
	$(call need,CKPT,checkpoint,logs/train/runs/<run>/checkpoints/best.ckpt)
	$(call need,OUT,directory to write,hf/mamba-tiny)
	$(PYTHON) -m lethe.interop export $(CKPT) $(OUT) $(ARGS)

import: install ## transformers dir -> Lethe checkpoint: make import HF=<local model dir> OUT=<file.ckpt>
	$(call need,HF,local transformers directory,hf/mamba-130m-hf)
	$(call need,OUT,checkpoint to write,mamba-130m.ckpt)
	$(PYTHON) -m lethe.interop import $(HF) $(OUT) $(ARGS)

compare: install ## MODEL (mamba-tiny) vs its parameter-matched Transformer++ (same data order and budget), then eval.py on both
	$(PYTHON) train.py -m model=$(MODEL) baseline=none,matched task_name=compare hydra.sweep.dir=$(EXP_DIR) $(ARGS) $(AND_THEN) \
	$(PYTHON) eval.py ckpt=$(EXP_DIR) max_tokens=262144 out_dir=$(EXP_DIR)/eval $(REPORT_STATUS)

# the architecture comparison: the four tiny families, parameter-matched (500-510k), on the same data order and tokens
ZOO_MODELS ?= mamba-tiny,mamba2-tiny,hybrid-tiny,transformer-tiny
ZOO_STEPS ?= 300
zoo: install ## mamba-tiny, mamba2-tiny, hybrid-tiny, transformer-tiny: same data and tokens, then one eval.py table + plots
	$(PYTHON) train.py -m model=$(ZOO_MODELS) trainer.max_steps=$(ZOO_STEPS) test_after_training=false task_name=zoo \
	  hydra.sweep.dir=$(EXP_DIR) $(ARGS) $(AND_THEN) \
	$(PYTHON) eval.py ckpt=$(EXP_DIR) max_tokens=65536 out_dir=$(EXP_DIR)/eval $(REPORT_STATUS)

sweep: install ## a learning-rate sweep over both tiny models (Hydra multirun), then its report
	$(PYTHON) train.py -m optim.lr=1e-3,3e-3 model=mamba-tiny,transformer-tiny task_name=sweep hydra.sweep.dir=$(EXP_DIR) $(ARGS) $(AND_THEN) \
	$(PYTHON) eval.py sweep=$(EXP_DIR) out_dir=$(EXP_DIR)/report $(REPORT_STATUS)

hparams: install ## an Optuna search over the learning rate (hparams_search=lr), then its report
	$(PYTHON) train.py -m hparams_search=lr hydra.sweep.dir=$(EXP_DIR) $(ARGS) $(AND_THEN) \
	$(PYTHON) eval.py sweep=$(EXP_DIR) out_dir=$(EXP_DIR)/report $(REPORT_STATUS)

report: install ## table + plots of a sweep: make report SWEEP=<sweep dir>
	$(call need,SWEEP,sweep directory,logs/sweep/<time>)
	$(PYTHON) eval.py sweep=$(SWEEP) $(ARGS)

ablation: install ## selective copying with each of delta/B/C input-dependent, all, none (paper Tables 1 and 7)
	$(PYTHON) train.py -m experiment=selective-copying hydra.sweep.dir=$(EXP_DIR) $(ARGS) \
	  "model.selective={delta:true,B:true,C:true},{delta:false,B:false,C:false},{delta:true,B:false,C:false},{delta:false,B:true,C:false},{delta:false,B:false,C:true}" \
	  $(AND_THEN) $(PYTHON) eval.py sweep=$(EXP_DIR) out_dir=$(EXP_DIR)/report $(REPORT_STATUS)

induction: install ## induction heads: 2-layer Mamba, Mamba-2 and Transformer++ trained at length 32, scored up to 4096
	$(PYTHON) train.py experiment=induction-heads hydra.run.dir=$(EXP_DIR)/mamba $(ARGS)
	$(PYTHON) train.py experiment=induction-heads model=mamba2-tiny model.d_model=64 model.n_layer=2 hydra.run.dir=$(EXP_DIR)/mamba2 $(ARGS)
	$(PYTHON) train.py experiment=induction-heads model=transformer-tiny model.d_ff=128 hydra.run.dir=$(EXP_DIR)/transformer $(ARGS)
	$(PYTHON) eval.py ckpt=$(EXP_DIR) 'lengths=[1,2,8,32,128]' max_tokens=131072 out_dir=$(EXP_DIR)/eval

# the four families at the synthetic tasks' scale (2 layers, d_model 64; the hybrid: Mamba-2 then attention)
SYNTHETIC_MODELS = "mamba:model=mamba-tiny" "mamba2:model=mamba2-tiny" "hybrid:model=hybrid-tiny model.pattern=M* ~model.n_layer" \
                   "transformer:model=transformer-tiny model.d_ff=96"
synthetic: install ## the synthetic suite over Mamba, Mamba-2, hybrid, Transformer++: MQAR at 4/8/16 pairs, selective copying, induction
	@set -ef; for entry in $(SYNTHETIC_MODELS); do name=$${entry%%:*}; overrides=$${entry#*:}; \
	  $(PYTHON) train.py -m experiment=mqar data.task.num_pairs=4,8,16 $$overrides hydra.sweep.dir=$(EXP_DIR)/mqar/$$name $(ARGS); \
	  $(PYTHON) train.py experiment=selective-copying $$overrides hydra.run.dir=$(EXP_DIR)/selective-copying/$$name $(ARGS); \
	  $(PYTHON) train.py experiment=induction-heads $$overrides hydra.run.dir=$(EXP_DIR)/induction/$$name $(ARGS); \
	done
	$(PYTHON) eval.py ckpt=$(EXP_DIR)/mqar 'lengths=[1]' out_dir=$(EXP_DIR)/mqar/eval
	$(PYTHON) eval.py ckpt=$(EXP_DIR)/selective-copying out_dir=$(EXP_DIR)/selective-copying/eval
	$(PYTHON) eval.py ckpt=$(EXP_DIR)/induction 'lengths=[1,2,8,32,128]' max_tokens=131072 out_dir=$(EXP_DIR)/induction/eval

bench: install ## scan speed and memory: fused kernels, chunked and the sequential reference side by side
	$(PYTHON) bench/scan.py $(ARGS)

bench-train: install ## whole training steps: Lethe's Mamba, its matched Transformer++, transformers' Mamba
	$(PYTHON) bench/train_step.py $(ARGS)

bench-generate: install ## decoding speed and memory: Mamba's state vs the Transformer's KV cache
	$(PYTHON) bench/generate.py $(ARGS)

clean: ## remove caches (tokenized data, __pycache__, pytest); keeps runs in logs/
	find data -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache src/*.egg-info kernels/build

distclean: clean ## also remove .venv and logs/
	rm -rf $(VENV) logs
