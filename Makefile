# recbench — the README's commands. Everything installs into .venv from requirements/cpu.lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
export RECBENCH_DATA_ROOT ?= datasets
PORT ?= 5000

.PHONY: setup setup-cluster setup-gpu test-gpu tracking-server tracking-server-stop tracking-server-status data demo test test-portable test-slow dashboard report claims bench clean-runs sweep-smoke sweep-movielens100k sweep-synthetic

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

## setup-gpu: the CUDA stack (requirements/gpu.lock: torch 2.13.0 CUDA 13.0, fbgemm-gpu 1.8.0, torchrec 1.8.0)
# in its own venv GPU_VENV (.venv-gpu), then checks it; for a Linux x86_64 host with an NVIDIA driver
# and an Ampere-or-newer GPU. Untested on a GPU so far (docs/gpu.md says what runs there)
GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
setup-gpu: $(GPU_VENV)/.install-stamp
$(GPU_VENV)/.install-stamp: requirements/gpu.lock pyproject.toml
	@test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install --quiet --no-deps -r requirements/gpu.lock
	$(GPU_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@$(GPU_PY) -c "import ctypes; ctypes.CDLL('libnvidia-ml.so.1')" 2>/dev/null || { echo "setup-gpu: installed in \
	$(GPU_VENV), but fbgemm-gpu (CUDA) loads only with the NVIDIA driver (libnvidia-ml.so.1): use a GPU host" >&2; exit 1; }
	$(GPU_PY) -c "import torch, fbgemm_gpu, torchrec; assert torch.version.cuda, 'torch is not a CUDA build'; \
	  assert hasattr(torch.ops.fbgemm, 'asynchronous_complete_cumsum'), 'FBGEMM ops not registered'; \
	  print('recbench GPU install:', torch.__version__, 'CUDA', torch.version.cuda, \
	        '| GPUs:', torch.cuda.device_count() if torch.cuda.is_available() else 'none visible')"
	@touch $@

## test-gpu: the CUDA tests (pytest -m gpu, tests/gpu/) in GPU_VENV; they skip, saying why, where no GPU is
# visible (without the NVIDIA driver setup-gpu already stops, saying so). Not run by CI (`make test`)
test-gpu: setup-gpu
	$(GPU_PY) -m pytest -q -m gpu tests/gpu

## tracking-server: an MLflow tracking server over PostgreSQL (Debian's postgresql package) for sweeps
# over several machines; both on 127.0.0.1 unless MLFLOW_HOST is set (docs/tracking.md). As root,
# PostgreSQL runs as the system user postgres. Settings: TRACKING_SERVER_DIR (.tracking-server),
# PG_PORT (5433), MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (4), MLFLOW_SERVER_OPTS
tracking-server: setup
	@$(PY) -c "import psycopg2" 2>/dev/null || $(PY) -m pip install --quiet --no-deps $$(grep '^psycopg2-binary==' requirements/cluster.lock)
	bash scripts/tracking_server.sh start

## tracking-server-stop: stop the MLflow server and its PostgreSQL (the runs stay in TRACKING_SERVER_DIR)
tracking-server-stop:
	bash scripts/tracking_server.sh stop

## tracking-server-status: whether the MLflow server answers and its PostgreSQL runs
tracking-server-status:
	bash scripts/tracking_server.sh status

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

## claims: reports/claims.md, the seed papers' headline claims against recbench's runs (verdicts by fixed rules);
# from the committed reference records, or CLAIMS_FROM="--tracking-uri sqlite:///mlflow.db" for a store
CLAIMS_FROM ?= --records reports/reference/movielens100k/runs.json reports/reference/synthetic/runs.json
claims: setup
	$(PY) -m recbench.reporting.claims $(CLAIMS_FROM) --out reports/claims.md

## bench: the performance harness
bench: setup
	$(BIN)/recbench-bench
