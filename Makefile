# The two commands (README): `make demo` and `make test`. Both set everything up first;
# a second run skips set-up unless setup.py or this Makefile changed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SYSPKGS := pkg-config libturbojpeg0-dev libopencv-dev libjpeg-dev
PYTEST_ARGS ?=

.PHONY: setup demo lint test bench clean-venv gpu-wheels gpu-suite gpu-dry-run

$(STAMP): setup.py Makefile loaders/_jpeg_region.c
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
	$(VENV)/bin/ruff check    # rules in .ruff.toml

test: lint
	FASTSSL_REQUIRE_EXTRAS=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/fastssl bench --help

clean-venv:
	rm -rf $(VENV)

# The GPU suite (benchmarks/gpu_suite.py): every GPU check in one device-tool call,
#   run(command="make gpu-suite", carry=[".whl"], timeout_s=540)   (or "bash benchmarks/gpu_suite.sh")
# gpu-wheels: here, the wheels that machine lacks (Python 3.12, x86-64) -> .whl/ (ignored; carried).
GPU_PY ?= python3
GPU_WHEELS ?= kornia==0.9.0 kornia_rs==0.2.0 simplejpeg==1.9.0 webdataset==1.0.2 braceexpand==0.1.7 \
  matplotlib==3.11.2 contourpy==1.3.2 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 \
  python-dateutil==2.9.0.post0 six==1.17.0
GPU_WHEELS_MAX_MIB ?= 60
GPU_SUITE_ARGS ?=

gpu-wheels:
	@set -e; \
	if [ -x $(PY) ]; then PIP_PY=$(PY); else PIP_PY=python3; fi; \
	rm -rf .whl; mkdir -p .whl; \
	$$PIP_PY -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --implementation cp --no-deps \
	  -d .whl $(GPU_WHEELS); \
	ls -l .whl; \
	size=$$(cat .whl/*.whl | wc -c); \
	echo "[gpu-wheels] $$(ls .whl/*.whl | wc -l) wheels, $$(awk "BEGIN{printf \"%.1f\", $$size/1048576}") MiB ($$size bytes) in .whl/"; \
	if [ $$size -gt $$(($(GPU_WHEELS_MAX_MIB) * 1024 * 1024)) ]; then \
	  echo "[gpu-wheels] over $(GPU_WHEELS_MAX_MIB) MiB: the device tool carries 64 MiB in all" >&2; exit 1; fi

# On the GPU machine: its python3, fastssl from this checkout (not installed)
gpu-suite:
	GPU_PY=$(GPU_PY) bash benchmarks/gpu_suite.sh $(GPU_SUITE_ARGS)

# Here: the suite's CPU dry run (--device cpu --quick) and its budget/timeout tests
gpu-dry-run: setup
	$(PY) -m pytest -q tests/test_gpu_suite.py $(PYTEST_ARGS)
