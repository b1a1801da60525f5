# retune: `make` lists the verbs. `make run` and `make test` set up what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Optional extras on top of dev, e.g. `make setup EXTRAS=dev,ray` (Ray runner, ~270 MB).
EXTRAS ?= dev
# dvc.yaml's `python -m tasks.<stage>` and `mlflow models serve` must find the venv's tools.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Once per clone (not on every make call: starting dvc takes ~0.4 s).
.dvc/config.local: | $(STAMP)
	@$(BIN)/dvc config --local core.analytics false 2>/dev/null || true

setup: $(STAMP) .dvc/config.local ## create .venv and install the pinned dependencies

data: setup ## write the sample corpus into data/incoming if it is empty
	$(BIN)/retune sample

run: data ## set up, then run the retraining flow end to end on data/incoming
	$(BIN)/retune run

BASE ?= smollm2-135m-instruct
base: setup ## prepare a pretrained chat model for train.base_model (BASE=smollm2-135m-instruct)
	$(BIN)/retune base $(BASE)

repro: data ## reproduce the pipeline with DVC (skips stages whose inputs did not change)
	$(BIN)/dvc repro

test: setup ## set up, then run the test suite (all of it, as CI does)
	$(BIN)/python -m pytest

test-fast: setup ## the unit and contract tiers only (no flows, servers or trainings)
	$(BIN)/python -m pytest -m "not slow"

lint: setup ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy retune tasks flows

ui: setup ## browse runs and the model registry: MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

prefect-server: setup ## Prefect server and UI on http://127.0.0.1:4200 (state in .prefect/)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

deploy: setup ## serve the retrain, data-check and drift-check deployments (needs make prefect-server)
	PREFECT_API_URL=http://127.0.0.1:4200/api $(BIN)/retune deploy

.PHONY: prefect-server deploy

serve: setup ## serve the production model: OpenAI-compatible API on http://127.0.0.1:8000/v1
	$(BIN)/retune serve

.PHONY: serve

bench: setup ## run the benchmarks and write BENCHMARKS.md (tens of minutes)
	$(BIN)/python -m benchmarks.run_all

.PHONY: bench

clean: ## remove generated outputs (keeps data/incoming, models/base, mlruns and .venv)
	rm -rf data/prepared data/quarantine data/clean data/split models/candidate models/checkpoints reports

.PHONY: help setup data run base repro test test-fast lint ui clean
