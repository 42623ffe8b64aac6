# The two commands a new user runs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export HYDRA_FULL_ERROR := 1

.PHONY: demo test test-fast test-full install clean-demo update update-demo prefect prefect-down stack stack-down postgres docs docs-serve

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/python -m devtools.install '.[test]'
	$(BIN)/python -m devtools.venv_path
	touch $(STAMP)

install: $(STAMP)

## Run the main job: the whole offline demo pipeline under DVC.
demo: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	$(BIN)/recall summary

## The update loop, once: ingest every ready batch of the stream source (params.yaml's
## dataset.source), then `dvc repro`: the new tasks' stages and the report.
update: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	$(BIN)/recall update
	$(BIN)/recall summary

## The update loop offline: the next batch of the shapes world lands in data/stream-source,
## then `make update` makes it the next task. Run it again for the next batch (5 in all).
## The first call switches params.yaml to experiment=stream_demo (git checkout params.yaml
## switches back).
update-demo: $(STAMP)
	$(BIN)/python -c "import sys, yaml; sys.exit(yaml.safe_load(open('params.yaml'))['dataset']['name'] != 'stream')" \
	  || $(BIN)/recall compose-params experiment=stream_demo
	$(BIN)/recall stream-demo data/stream-source --next
	$(MAKE) update

## Run the test suite: unit tests and the end-to-end pipeline tests (dvc repro, the update
## loop, two checkouts sharing an S3 remote), on real MLflow and S3 API servers.
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=10 -m "not stack and not real_size"

## Unit tests only.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## Everything, including the tests that bring up a whole stack (Prefect servers with workers
## running the demo, a worker killed mid-stage, the PostgreSQL-backed team stack running two
## batches, infra/compose.yaml's own commands run as processes through one batch) and the
## real-size ViT-B/16 backbone path: about 40 more minutes on 2 cores.
test-full: $(STAMP) postgres
	$(BIN)/python -m pytest

## Build the documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

## Serve the documentation on http://127.0.0.1:8000, rebuilt on every save.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

## Debian's PostgreSQL server, which `make stack` and its test run (installed when missing).
postgres:
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

## Prefect on this machine: server on loopback (sqlite in .prefect/), pools cpu and gpu with a
## process worker each, the gpu concurrency limit, prefect.yaml's deployments. Port: PREFECT_PORT.
prefect: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m flows.local up

## Stop what `make prefect` started, by the PIDs in .prefect/.
prefect-down:
	$(BIN)/python -m flows.local down

## The team stack without containers, on 127.0.0.1 (infra/compose.yaml is the one with
## containers): PostgreSQL, an S3 API with the buckets, MLflow server, Prefect server (when
## installed). State, logs and PIDs in .stack/; `source .stack/env` points clients at it.
stack: $(STAMP) postgres
	PYTHON=$(BIN)/python infra/local/up

## Stop exactly what `make stack` started (the PIDs in .stack/pids/).
stack-down:
	PYTHON=$(BIN)/python infra/local/down
