# transfer - make targets. `make help` lists them.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint train smoke clean bench bench-gpu gpu-check bench-scaling

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

setup: ## create .venv and install transfer with its test extras
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"

test: ## the full test suite (what CI runs)
	$(BIN)/pytest

test-fast: ## the suite without tests marked slow (edit-run loop)
	$(BIN)/pytest -m "not slow"

lint: ## ruff check . (line length 120, pyflakes, pycodestyle, import order, bugbear)
	$(BIN)/ruff check .

train: ## transfer train with ARGS="key=value ..." overrides
	$(BIN)/transfer train $(ARGS)

smoke: ## offline smoke run on synthetic data (under a minute on CPU)
	$(BIN)/transfer train experiment=smoke $(ARGS)

bench: ## CPU benchmarks and the races against timm's train.py and a probe -> outputs/bench/bench.json + table; exits 1 if a target is missed (~15 min)
	$(BIN)/transfer bench --check $(BENCH_INPUTS) $(ARGS)

bench-scaling: ## one epoch's wall time and peak memory at 1x, 4x, 16x the photos -> outputs/bench/bench_scaling.json
	$(BIN)/transfer bench --scaling $(BENCH_INPUTS) $(ARGS)

bench-gpu: ## GPU images/s: resnet50, efficientnet_b0, AMP + channels_last (needs CUDA; ARGS="--data-root DIR")
	$(BIN)/transfer bench --gpu $(ARGS)

gpu-check: ## every CUDA code path in one call (.ci/gpu-check.sh, 6-9 min on a GPU); CPU dry run: DEVICE=cpu SMALL=1 COMPILE_BACKEND=eager
	PY=$(BIN)/python bash .ci/gpu-check.sh $(or $(OUT),outputs/gpu-check)

clean: ## delete run outputs and caches
	rm -rf outputs/runs outputs/multirun .pytest_cache

# --------------------------------------------------------------------------- lesson exercises
# `make exerciseN` runs lesson exercise N (docs/exercises.md) and writes its table (results.md,
# results.csv) and figure into $(EXERCISES)/exN/; its runs go to $(EXERCISES)/exN/runs/,
# emptied first. The real exercises download their data and weights on first use.
# QUICK=1: small real sets (hymenoptera photos; eurosat5 satellite patches as exercise 4's far domain;
# timm tf_efficientnet_lite0 ImageNet weights), few epochs and images, 3 seeds per row (the tables show
# mean ± std): minutes on a CPU. ASSETS=DIR (or TRANSFER_ASSETS) runs offline on local copies
# (DIR/data/hymenoptera, DIR/data/eurosat5, DIR/hf-home); without it `transfer exercise assets` fetches
# them once into the data cache, every file checked against lesson/manifests/.
# ARGS="key=value ..." is passed last, so it overrides both (e.g. ARGS="trainer.device=cpu").
.PHONY: exercises docs-exercises exercise1 exercise2 exercise3 exercise4 exercise5
EXERCISES ?= outputs/exercises
ASSETS ?= $(TRANSFER_ASSETS)
# `make bench`'s races: timm's train.py (PEER_TIMM), the photos and weights under ASSETS; each absent one is skipped
PEER_TIMM ?= $(TRANSFER_PEER_TIMM)
BENCH_INPUTS = $(if $(PEER_TIMM),--peer-timm $(PEER_TIMM)) \
  $(if $(ASSETS),--photos $(ASSETS)/data/hymenoptera --hf-home $(ASSETS)/hf-home)
QUICK ?=
TRANSFER := $(BIN)/transfer
ifneq ($(filter 1 true yes,$(QUICK)),)
# each exercise's quick settings are a config: conf/quick/exerciseN.yaml; $$assets is the assets folder
ifeq ($(strip $(ASSETS)),)
EX_ASSETS := assets=$$($(TRANSFER) exercise assets) || exit $$?;
EX_ENV := HF_HUB_OFFLINE=1 TRANSFER_ASSETS=$$assets
else
EX_ASSETS := assets=$(ASSETS);
EX_ENV := HF_HOME=$$assets/hf-home HF_HUB_OFFLINE=1 TRANSFER_ASSETS=$$assets
endif
EX1_ARGS := quick=exercise1
EX2_ARGS := quick=exercise2
EX3_EXPERIMENTS := exercise3_lite0,exercise3_lite0_uniform
EX3_ARGS := quick=exercise3
EX4_ARGS := quick=exercise4
EX4_NEAR ?= dataset=folder dataset.root=$$assets/data/hymenoptera
EX4_FAR ?= dataset=folder dataset.root=$$assets/data/eurosat5
EX5_ARGS := --seeds 0,1,2 quick=exercise5
else
EX_ASSETS :=
EX_ENV :=
EX3_EXPERIMENTS := exercise3,exercise3_uniform
EX4_NEAR ?= dataset=cifar10
EX4_FAR ?= dataset=dtd
endif

exercises: exercise1 exercise2 exercise3 exercise4 exercise5 ## all five lesson exercises (QUICK=1: offline)

docs-exercises: ## rewrite docs/exercises.md's quick-mode tables from $(EXERCISES) (after `make exercises QUICK=1`)
	$(TRANSFER) exercise tables --from $(EXERCISES) --into docs/exercises.md $(if $(ASSETS),--assets $(ASSETS))

exercise1: ## lesson ex. 1: feature extraction vs fine-tuning, ResNet-18, Flowers102 x500 (QUICK=1: offline)
	rm -rf $(EXERCISES)/ex1/runs
	$(EX_ASSETS) $(EX_ENV) $(TRANSFER) train -m experiment=exercise1 $(EX1_ARGS) $(ARGS) hydra.sweep.dir=$(EXERCISES)/ex1/runs; \
	  rc=$$?; $(TRANSFER) report $(EXERCISES)/ex1/runs --out $(EXERCISES)/ex1 && exit $$rc

exercise2: ## lesson ex. 2: gradual unfreezing 5+5+10 epochs, val accuracy plot (QUICK=1: offline)
	rm -rf $(EXERCISES)/ex2/runs
	$(EX_ASSETS) $(EX_ENV) $(TRANSFER) train -m experiment=exercise2 $(EX2_ARGS) $(ARGS) hydra.sweep.dir=$(EXERCISES)/ex2/runs; \
	  rc=$$?; $(TRANSFER) report $(EXERCISES)/ex2/runs --out $(EXERCISES)/ex2 && \
	  { cp $(EXERCISES)/ex2/runs/0/curves.png $(EXERCISES)/ex2/curves.png 2>/dev/null || true; exit $$rc; }

exercise3: ## lesson ex. 3: discriminative lrs vs uniform 1e-4, CIFAR-10 x2000 (QUICK=1: offline)
	rm -rf $(EXERCISES)/ex3/runs
	$(EX_ASSETS) $(EX_ENV) $(TRANSFER) train -m experiment=$(EX3_EXPERIMENTS) $(EX3_ARGS) $(ARGS) hydra.sweep.dir=$(EXERCISES)/ex3/runs; \
	  rc=$$?; $(TRANSFER) report $(EXERCISES)/ex3/runs --out $(EXERCISES)/ex3 && exit $$rc

exercise4: ## lesson ex. 4: scratch / feature extraction / fine-tuning on CIFAR-10 and DTD (QUICK=1: offline)
	rm -rf $(EXERCISES)/ex4/runs
	$(EX_ASSETS) $(EX_ENV) $(TRANSFER) train -m experiment=exercise4 $(EX4_NEAR) $(EX4_ARGS) $(ARGS) hydra.sweep.dir=$(EXERCISES)/ex4/runs/near; \
	  rc1=$$?; $(EX_ENV) $(TRANSFER) train -m experiment=exercise4 $(EX4_FAR) $(EX4_ARGS) $(ARGS) hydra.sweep.dir=$(EXERCISES)/ex4/runs/far; \
	  rc2=$$?; $(TRANSFER) report $(EXERCISES)/ex4/runs --out $(EXERCISES)/ex4 && exit $$(( rc1 | rc2 ))

exercise5: ## lesson ex. 5: ImageNet normalization vs none vs 0.5, EfficientNet-B0 (QUICK=1: offline)
	$(EX_ASSETS) $(EX_ENV) $(TRANSFER) exercise normalization --out $(EXERCISES)/ex5 $(EX5_ARGS) $(ARGS)
