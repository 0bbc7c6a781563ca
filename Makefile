# recbench — the README's commands. Everything installs into .venv from requirements/cpu.lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
export RECBENCH_DATA_ROOT ?= datasets
PORT ?= 5000

.PHONY: setup setup-cluster data demo test test-portable test-slow dashboard report bench clean-runs sweep-smoke sweep-movielens100k sweep-synthetic

## setup: create .venv if missing and install the pinned CPU stack (no CUDA wheels), then self-check
setup: $(STAMP)
$(STAMP): requirements/cpu.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m recbench.install_check
	@touch $(STAMP)

## setup-cluster: the optional cluster launchers (Ray, submitit/SLURM) on top of the CPU stack (not in CI)
setup-cluster: setup
	$(PY) -m pip install --quiet --no-deps -r requirements/cluster.lock

## data: fetch MovieLens-100K offline (from the recbole 1.2.1 wheel, checksum-verified)
data: setup
	$(BIN)/recbench-data fetch movielens100k

## demo: a small movielens100k sweep (full + 5 methods x 2 budgets, 1 seed, 2 parallel jobs), then its report
demo: setup data
	$(BIN)/recbench-sweep demo
	$(BIN)/recbench-report --dataset movielens100k
	@echo
	@echo "dashboard:   make dashboard   (MLflow UI on http://127.0.0.1:$(PORT))"

## sweep-smoke: every registered method at one budget for a few steps (registry smoke test)
sweep-smoke: setup data
	$(BIN)/recbench-sweep smoke $(JOBS_FLAG) $(ARGS)

## sweep-movielens100k: the MovieLens-100K leaderboard (every method x 6 budgets x 3 seeds + full)
sweep-movielens100k: setup data
	$(BIN)/recbench-sweep leaderboard_movielens100k $(JOBS_FLAG) $(ARGS)

## sweep-synthetic: the synthetic leaderboard (every method x 6 budgets x 3 seeds + full); JOBS=2 for parallel
# JOBS=N overrides the preset's number of parallel jobs (leaderboard_synthetic: 1, the others: 2)
JOBS ?=
JOBS_FLAG = $(if $(JOBS),--jobs $(JOBS))
sweep-synthetic: setup
	$(BIN)/recbench-sweep leaderboard_synthetic $(JOBS_FLAG) $(ARGS)

## test: the default test suite (installs first if needed)
test: setup
	$(PY) -m pytest -q

## test-portable: the default suite once per CPU dispatch level torch (and FBGEMM) can be forced to
# default = torch's scalar kernels; avx2 = torch's AVX2 kernels, FBGEMM limited to AVX2; native =
# what this CPU dispatches to unforced (avx512 on AVX-512 machines). About 3x `make test`.
PORTABLE_LEVELS ?= default avx2 native
test-portable: setup
	@set -e; for level in $(PORTABLE_LEVELS); do \
	  case $$level in \
	    native) env=;; \
	    avx2) env="ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2";; \
	    *) env="ATEN_CPU_CAPABILITY=$$level";; \
	  esac; \
	  echo "== test-portable: $$level ($${env:-unforced})"; start=$$(date +%s); \
	  env $$env $(PY) -m pytest -q; \
	  echo "== test-portable: $$level passed in $$(( $$(date +%s) - start )) s"; \
	done

## test-slow: the long tests too
test-slow: setup
	$(PY) -m pytest -q -m "slow or not slow"

## dashboard: the MLflow UI over the local SQLite store, on 127.0.0.1 only
dashboard: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

## report: leaderboards (md, csv, self-contained html, png) under reports/<dataset>/ from the MLflow store
report: setup
	$(BIN)/recbench-report $(ARGS)

## bench: the performance harness
bench: setup
	$(BIN)/recbench-bench
