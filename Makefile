# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nrr-installed
export UV_CACHE_DIR := $(CURDIR)/.cache/uv
export PIP_CACHE_DIR := $(CURDIR)/.cache/pip
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: env demo test test-fast clean-env

env: $(STAMP)

# torch first, from the local CPU wheel (anything that asks for torch later would pull a CUDA build): uv
# unpacks it in ~5 s where pip takes ~40 s, and pip stays the fallback; then every other package at its
# pinned version without dependency resolution (constraints/cpu.txt was resolved as a whole; see its
# header for the three deliberate exclusions).
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
$(STAMP): constraints/cpu.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$$(sed -n 's/^uv==//p' constraints/cpu.txt)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps --no-index --find-links $(TORCH_WHEELS) \
		torch==2.13.0 || $(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -r constraints/cpu.txt
	$(BIN)/uv pip uninstall --quiet --python $(BIN)/python torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, megatron.core, nemo_curator, nemo_run, vllm, math_verify, recipes" 2>/dev/null
	@touch $(STAMP)

demo: env
	$(BIN)/nrr pipeline --config nemo_configs/pipeline/embedded.yaml

# tests run several processes at once on two cores: idle OpenMP threads sleep instead of spinning. Two xdist
# workers take one test module at a time each (tests/conftest.py keeps modules sharing a launch together): most
# of a test's time is single-threaded process start-up (imports, engines), which the other worker overlaps.
test: export OMP_WAIT_POLICY := PASSIVE
test: env
	$(BIN)/python -m pytest -q -ra --durations=30 --timeout=900 -n 2 tests

test-fast: export OMP_WAIT_POLICY := PASSIVE
test-fast: env
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

clean-env:
	rm -rf $(VENV)
