# One virtualenv, created on first use and reused; every target installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Nothing phones home; servers bind to loopback.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup data run core-run monitor test test-fast lint bench bench-stability bench-gate-power bench-numerics bench-flow bench-images bench-scaling serve trigger server deploy worker serve-model mlflow-ui mlflow-server repro clean help

help:
	@echo "make run          set up .venv, write the embedded data, run the pipeline flow once (minutes on CPU;"
	@echo "                  ARGS='--set key=value ...' overrides params, e.g. --set gate.confidence=null)"
	@echo "make test         set up and run the whole test suite (what CI runs, with make lint)"
	@echo "make test-fast    the day-to-day selection: every test not marked slow"
	@echo "make lint         ruff check + ruff format --check"
	@echo "make serve        Prefect server on 127.0.0.1:4200 + the scheduled deployment (Ctrl-C stops both)"
	@echo "make trigger      start a run of the scheduled deployment now (served or on the pool); prints its UI address"
	@echo "make server       a Prefect server alone on 127.0.0.1:4200 (SERVER_HOST=0.0.0.0 for workers elsewhere)"
	@echo "make deploy       the scheduled deployments on the process work pool POOL (default oodgate; created"
	@echo "                  if absent) of the server at PREFECT_API_URL (default 127.0.0.1:4200), then exit"
	@echo "make worker       a Prefect worker on this machine that runs the pool's flow runs (POOL, PREFECT_API_URL)"
	@echo "make serve-model  serve the registered champion over REST on 127.0.0.1:5001 (mlflow models serve)"
	@echo "make mlflow-ui    MLflow UI on 127.0.0.1:5000 over ./mlflow.db"
	@echo "make mlflow-server  shared MLflow on 127.0.0.1:5050: PostgreSQL in .mlflow-server/, proxied artifacts (Ctrl-C stops both)"
	@echo "make repro        reproduce with DVC (dvc repro), then dvc metrics show"
	@echo "make core-run     the core library alone (no Prefect, no MLflow): train, evaluate, print the table"
	@echo "make monitor      score a batch with the champion, alert on drift (BATCH=path; default: two demo batches)"
	@echo "make bench        per-method training/inference time relative to SoftMax"
	@echo "make bench-stability  the gate's decisions on three disjoint seed sets (about 10 min on CPU)"
	@echo "make bench-gate-power  how often the gate promotes known-truth candidates: by evidence, test-set size, seeds"
	@echo "make bench-numerics  training and evaluation time, portable numerics against native and each pin alone"
	@echo "make bench-flow   wall time of the Prefect flow against the core alone (same params)"
	@echo "make bench-images torchvision resnet18 on a folder of JPEGs at 64 and 224: decode, train, eval images/s"
	@echo "make bench-scaling  the fan-out per task runner (threads, Dask), per-task overhead, DDP step time"
	@echo "make setup        only create .venv and install the pinned stack"
	@echo "make data         only write the embedded data into data/ (skipped if data/ exists)"
	@echo "make clean        remove the pipeline's working files (not the committed results, not mlflow.db)"
	@echo "make help         this list"

# uv installs the same pinned wheels as pip from the package index, in parallel: a cold install
# (PyTorch's CUDA wheels included) took 39 s against pip's 99 s (docs/benchmarks.md). The .pyc files
# are compiled at install, as pip does. Where uv cannot reach the index (a private mirror configured
# for pip only: uv reads UV_INDEX_URL, not pip.conf), pip installs the same pins instead.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt uv
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -c constraints.txt -e ".[pipeline,dev]" \
		|| { echo "uv could not install the stack (above); installing it with pip"; \
		     $(PY) -m pip install -q -c constraints.txt -e ".[pipeline,dev]"; }
	touch $(STAMP)

setup: $(STAMP)

# The embedded default data (MNIST-5k, photo patches) into data/; its hash is the one in data.dvc.
# Skipped when data/ exists, so a user's own data (versioned with `dvc add data`) is never touched.
data: $(STAMP)
	test -e data || $(PY) -m oodgate materialize --root data

# The main job: the Prefect flow on the embedded default (ephemeral Prefect, SQLite MLflow).
run: data
	$(PY) -m flows.pipeline $(ARGS)

# The core alone, no Prefect/MLflow: train and evaluate every loss, print the table.
core-run: data
	$(PY) -m oodgate run $(ARGS)

# The monitoring flow: score BATCH (a folder of images or an .npz) with the registered champion;
# without BATCH, two demo batches written from the embedded data (after `make run`).
monitor: data
	$(PY) -m flows.monitor $(if $(BATCH),--batch $(BATCH),--demo) $(ARGS)

# Three pytest processes on 2 cores, each taking whole files: the end-to-end tests wait on servers
# and subprocesses much of the time (docs/benchmarks.md has the measured times).
test: $(STAMP)
	$(PY) -m pytest -q -n 3 --dist loadfile --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Local Prefect server on 127.0.0.1:4200 plus the deployment on the params.yaml cron schedule.
serve: data
	$(PY) -m flows.deploy --host 127.0.0.1 --port 4200

# Start a run of the scheduled deployment now (against PREFECT_API_URL, default the server of `make serve`
# or `make server`), whether `make serve` serves it or `make deploy` put it on a work pool.
trigger: $(STAMP)
	$(PY) -m flows.trigger $(ARGS)

# A Prefect server alone, for the work pool: loopback unless SERVER_HOST says otherwise.
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 4200
server: $(STAMP)
	$(PY) -m prefect server start --host $(SERVER_HOST) --port $(SERVER_PORT)

# The scheduled deployments on the process work pool POOL (default $$OODGATE_POOL, else oodgate) of
# the server at PREFECT_API_URL (default http://127.0.0.1:4200/api); workers load the code from this
# checkout's path on their machine (ARGS="--checkout /path/on/workers" when it differs).
deploy: $(STAMP)
	$(PY) -m flows.workpool deploy $(if $(POOL),--pool $(POOL)) $(ARGS)

# A worker of POOL on this machine: it runs the pool's flow runs in subprocesses, here.
worker: data
	$(PY) -m flows.workpool worker $(if $(POOL),--pool $(POOL)) $(ARGS)

# The champion over REST (mlflow models serve, this .venv's packages, 127.0.0.1:5001).
serve-model: $(STAMP)
	$(PY) -m oodgate_mlflow.champion serve $(ARGS)

# MLflow UI over the local tracking database: 2 processes, `mlflow ui` and one uvicorn process.
# MLflow 3.17 starts uvicorn with 4 worker processes (and a multiprocessing resource tracker), 7 in
# all, unless told --workers 1; job execution off: no job consumers either.
MLFLOW_UI_PORT ?= 5000
mlflow-ui: $(STAMP)
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_UI_PORT)/#/experiments?workflowType=machine_learning (the Model training view)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(MLFLOW_UI_PORT) \
		--workers 1 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts

# A shared tracking server: PostgreSQL (Debian's postgresql package) in .mlflow-server/, proxied
# artifacts; flows use it with MLFLOW_TRACKING_URI=http://127.0.0.1:5050.
mlflow-server: $(STAMP)
	$(PY) -m oodgate_servers.mlflow_server --port 5050 $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_methods.py

bench-stability: data
	PYTHONPATH=. $(PY) benchmarks/bench_stability.py $(ARGS)

bench-gate-power: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/bench_gate_power.py $(ARGS)

bench-numerics: data
	PYTHONPATH=. $(PY) benchmarks/bench_numerics.py $(ARGS)

bench-flow: data
	PYTHONPATH=. $(PY) benchmarks/bench_flow.py $(ARGS)

bench-images: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/bench_images.py $(ARGS)

bench-scaling: data
	PYTHONPATH=. $(PY) benchmarks/bench_scaling.py $(ARGS)

# Exact reproduction: the DVC stages run `python -m oodgate ...`, so the venv's python comes first.
repro: data
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro
	cat artifacts/report.md

# Keeps the committed reference results (artifacts/metrics, inputs, gate.json, report.md) and mlflow.db.
clean:
	rm -rf artifacts/cache artifacts/prepared artifacts/train artifacts/calibrate artifacts/evaluate \
		artifacts/curves logs
