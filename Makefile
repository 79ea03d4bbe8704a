# The two commands (README): `make demo` and `make test`. Both set everything up first;
# a second run skips set-up unless setup.py or this Makefile changed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SYSPKGS := pkg-config libturbojpeg0-dev libopencv-dev
PYTEST_ARGS ?=
# lint: pyflakes, pycodestyle errors/warnings and import order (no config file: the top level is fixed)
RUFF_ARGS := --select E,F,W,I --line-length 120

.PHONY: setup demo lint test bench clean-venv

$(STAMP): setup.py Makefile
	@set -e; \
	if ! dpkg -s $(SYSPKGS) >/dev/null 2>&1; then \
	  echo "[setup] installing system packages for FFCV: $(SYSPKGS)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(SYSPKGS) >/dev/null; \
	fi; \
	[ -x $(PY) ] || python3 -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip wheel setuptools; \
	echo "[setup] torch 2.14.1 + torchvision 0.29.1"; \
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1; \
	echo "[setup] fastssl with all extras (dali, ffcv, webdataset, vit, bench, fast, wandb, dev)"; \
	$(PY) -m pip install -q -e '.[all]'; \
	touch $(STAMP)

setup: $(STAMP)

# Main job: short SimCLR pretraining on the embedded synthetic data; prints images/sec and kNN accuracy.
# --force: each `make demo` starts the demo run over (runs/demo)
demo: setup
	$(VENV)/bin/fastssl pretrain configs/demo.yaml --force

# Lint, then the full test suite (GPU-only tests skip without CUDA).
lint: setup
	$(VENV)/bin/ruff check $(RUFF_ARGS) fastssl loaders benchmarks tests

test: lint
	FASTSSL_REQUIRE_EXTRAS=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/fastssl bench --help

clean-venv:
	rm -rf $(VENV)
