# The set-up both README commands use goes through scripts/install.sh, the same install path the
# container image (deploy/Dockerfile) runs: a virtual environment with torch installed first, the package
# with its test extra, the image-dataset wheels, and the Debian packages the tests and zoos need (apt when
# root; otherwise unpacked into .mzsane/deb without root).
#
#   PYTHON=python3    interpreter that creates the venv          VENV=.venv   the venv
#   PIP_TORCH_ARGS=   pip options for the torch install only; empty: your pip configuration decides (plain
#                     PyPI on Linux x86_64 gives the CUDA build, several GB). For the CPU build (~200 MB):
#                     make setup PIP_TORCH_ARGS='--index-url https://download.pytorch.org/whl/cpu'
#   PYTEST_ARGS=      extra pytest arguments for `make test`, e.g. PYTEST_ARGS='-m "not slow" -x'
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
DEB_ROOT ?= $(CURDIR)/.mzsane/deb
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
export MZSANE_DEB_ROOT := $(DEB_ROOT)
PYTEST_ARGS ?=
INSTALL := PYTHON='$(PYTHON)' VENV='$(VENV)' DEB_ROOT='$(DEB_ROOT)' PIP_TORCH_ARGS='$(PIP_TORCH_ARGS)' scripts/install.sh

.PHONY: setup demo demo-quick test test-unit lint system-deps harness clean

$(VENV)/.installed: pyproject.toml Makefile scripts/install.sh
	$(INSTALL) python
	touch $@

system-deps:
	$(INSTALL) system

setup: $(VENV)/.installed system-deps

# The tests' Go harness (KubeRay's reconcilers, tests/operator), the etcd and kube-apiserver it runs them
# against (tests/apiserver) and Kueue's manager (tests/kueue): only `make test` needs Go, `make demo` does not.
harness:
	$(INSTALL) harness || echo "make: the KubeRay harness was not built; its tests skip (and fail under CI=true)"

# The main job on the embedded default: zoos -> shards -> Ray Train -> sampling -> evaluation.
demo: setup
	$(BIN)/mzsane demo

demo-quick: setup
	$(BIN)/mzsane demo --quick

lint: setup
	$(BIN)/ruff check mzsane tests

# Lint, then the whole suite: unit, integration (real SeaweedFS S3, Prometheus, local Ray, Helm), end to end.
test: lint harness
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .mzsane .pytest_cache
