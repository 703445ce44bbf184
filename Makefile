# PipeLLM — every target sets itself up; a fresh clone needs only `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INT_STAMP := $(VENV)/.installed-integrations
GEN := client/pipellm_client/_gen
PROTOS := $(wildcard proto/pipellm/v1/*.proto)
GEN_STAMP := $(GEN)/.stamp

.PHONY: all setup proto lint typecheck test test-quick demo bench bench-quick bench-engine bench-commit \
        loadtest gpu-check clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# torch (CPU build), transformers, accelerate, peft: only for the integration tests.
$(INT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,integrations]"
	@touch $@

setup: $(STAMP) $(GEN_STAMP)

# Generated code is built from proto/ and never edited; imports are made package-relative.
$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)/pipellm/v1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	sed -i -E 's/^from pipellm\.v1 import/from . import/' $(GEN)/pipellm/v1/*.py
	touch $(GEN)/__init__.py $(GEN)/pipellm/__init__.py $(GEN)/pipellm/v1/__init__.py
	@touch $@

proto: $(GEN_STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

test: setup $(INT_STAMP) lint typecheck
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

test-quick: setup
	$(VENV)/bin/pytest -q -ra -m "not slow and not integrations" $(PYTEST_ARGS)

demo: setup
	$(PY) -m bench.demo

bench-engine: setup
	$(PY) -m bench.engine

bench-commit: setup
	$(PY) -m bench.commit

bench: setup
	$(PY) -m bench.harness --full

bench-quick: setup
	$(PY) -m bench.harness --quick

loadtest: setup
	$(PY) -m bench.loadtest

gpu-check:
	bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) $(GEN) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
