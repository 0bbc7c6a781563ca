# recbench — the README's commands. Everything installs into .venv from requirements/cpu.lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
export RECBENCH_DATA_ROOT ?= datasets
PORT ?= 5000

.PHONY: setup data demo test test-slow dashboard report bench clean-runs

## setup: create .venv if missing and install the pinned CPU stack (no CUDA wheels), then self-check
setup: $(STAMP)
$(STAMP): requirements/cpu.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m recbench.install_check
	@touch $(STAMP)

## data: fetch MovieLens-100K offline (from the recbole 1.2.1 wheel, checksum-verified)
data: setup
	$(BIN)/recbench-data fetch movielens100k

## demo: the main job (installs first if needed)
demo: setup data
	$(BIN)/recbench -m dataset=movielens100k method=full seed=0
	$(BIN)/recbench-report --dataset movielens100k

## test: the default test suite (installs first if needed)
test: setup
	$(PY) -m pytest -q

## test-slow: the long tests too
test-slow: setup
	$(PY) -m pytest -q -m "slow or not slow"

## dashboard: the MLflow UI over the local SQLite store, on 127.0.0.1 only
dashboard: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

## report: leaderboards from the MLflow store
report: setup
	$(BIN)/recbench-report

## bench: the performance harness
bench: setup
	$(BIN)/recbench-bench
