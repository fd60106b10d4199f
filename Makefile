# transfer - make targets. `make help` lists them.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast train smoke clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

setup: ## create .venv and install transfer with its test extras
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"

test: ## the full test suite (what CI runs)
	$(BIN)/pytest

test-fast: ## the suite without tests marked slow (edit-run loop)
	$(BIN)/pytest -m "not slow"

train: ## transfer train with ARGS="key=value ..." overrides
	$(BIN)/transfer train $(ARGS)

smoke: ## offline smoke run on synthetic data (under a minute on CPU)
	$(BIN)/transfer train experiment=smoke $(ARGS)

clean: ## delete run outputs and caches
	rm -rf outputs/runs outputs/multirun .pytest_cache
