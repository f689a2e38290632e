# Every target installs what it needs into .venv first; `make demo` and `make test` work on a
# fresh machine. torch is pinned in the install step so pip takes the CPU build on disk here
# (pyproject.toml keeps torch>=2.4 for everyone else).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install demo demo-synthetic demo-summarize demo-tools demo-score tiny-model test test-fast bench clean \
	cluster-up cluster-status cluster-down

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

tiny-model: install
	test -f .demo/tiny-model/config.json || $(BIN)/batchgen init-model .demo/tiny-model

demo: tiny-model
	rm -rf .demo/output
	$(BIN)/batchgen run jobs/demo.yaml
	@echo "--- output in .demo/output (data/part-*.parquet); first rows:"
	$(BIN)/batchgen show .demo/output -n 6

# The two example jobs users come for (jobs/synthetic-qa.yaml, jobs/summarize-corpus.yaml).
demo-synthetic: tiny-model
	rm -rf .demo/synthetic-qa
	$(BIN)/batchgen run jobs/synthetic-qa.yaml
	$(BIN)/batchgen show .demo/synthetic-qa -n 4

demo-summarize: tiny-model
	rm -rf .demo/summaries
	$(BIN)/batchgen run jobs/summarize-corpus.yaml
	$(BIN)/batchgen show .demo/summaries -n 4

# Structured generation: function-calling data (messages + tools -> valid tool calls), and
# candidate answers ranked by log-likelihood (mode: score).
demo-tools: tiny-model
	rm -rf .demo/tool-calls
	$(BIN)/batchgen run jobs/tool-calls.yaml
	$(BIN)/batchgen show .demo/tool-calls -n 4

demo-score: tiny-model
	rm -rf .demo/scores
	$(BIN)/batchgen run jobs/score-answers.yaml
	$(BIN)/python jobs/rank_answers.py .demo/scores

# The whole suite; CI runs this. --durations names the slowest tests in every CI log.
test: install
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# The inner loop: no Ray, no S3 server, nothing marked slow (tests/conftest.py checks the markers).
# About 20 s on two busy cores with the tiny model cached in .pytest_cache, 30 s without.
test-fast: install
	$(BIN)/python -m pytest -m "not ray and not s3 and not slow" --durations=5 $(PYTEST_ARGS)

# Side-by-side performance figures as JSON lines (see README "Performance"); not part of `make test`.
# Each benchmark's lines also go to benchmarks/results-<name>-<date>.jsonl (-quick with BENCH_ARGS),
# its last line the machine's load while it ran.
BENCH_DATE ?= $(shell date +%Y-%m-%d)
BENCH_SUFFIX = $(BENCH_DATE)$(if $(BENCH_ARGS),-quick)
bench: tiny-model
	set -o pipefail; for b in engine system driver structured; do \
	  (cd benchmarks && ../$(BIN)/python bench_$$b.py $(BENCH_ARGS) | tee results-$$b-$(BENCH_SUFFIX).jsonl) || exit 1; \
	done

# A local multi-node Ray cluster on 127.0.0.1 (head with the dashboard + WORKERS worker nodes) to
# try `batchgen submit` on one machine; see cluster/README.md. The venv goes first on PATH so the
# cluster's job entrypoint finds `batchgen`.
CLUSTER_ENV = PATH="$(CURDIR)/$(BIN):$$PATH" RAY="$(CURDIR)/$(BIN)/ray" PYTHON="$(CURDIR)/$(BIN)/python"

cluster-up: tiny-model
	$(CLUSTER_ENV) cluster/local-cluster.sh up

cluster-status:
	$(CLUSTER_ENV) cluster/local-cluster.sh status

cluster-down:
	$(CLUSTER_ENV) cluster/local-cluster.sh down

clean:
	rm -rf .demo build *.egg-info
