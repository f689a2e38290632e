# Every target installs what it needs into .venv first; `make demo` and `make test` work on a
# fresh machine. torch is pinned in the install step so pip takes the CPU build on disk here
# (pyproject.toml keeps torch>=2.4 for everyone else).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	test -f .demo/tiny-model/config.json || $(BIN)/batchgen init-model .demo/tiny-model
	rm -rf .demo/output
	$(BIN)/batchgen run jobs/demo.yaml
	@echo "--- output in .demo/output (data/part-*.parquet); first rows:"
	$(BIN)/batchgen show .demo/output -n 6

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf .demo build *.egg-info
