# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both install into a virtual environment, .venv, made on first use from $(PYTHON): Debian's system
# Python refuses pip installs (externally-managed-environment), and nothing here touches it.
PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RECIPE ?= src/distillery/recipes/fmnist.yaml

.PHONY: venv install install-dev dataset run test lint bench

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "could not create $(VENV) with $(PYTHON); on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }

venv: $(VENV_PYTHON)

# torch==2.13.0 first: it is the CPU build; a plain `torch` requirement would pull a CUDA build.
install: $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --quiet torch==2.13.0
	$(VENV_PYTHON) -m pip install --quiet -e .

install-dev: install
	$(VENV_PYTHON) -m pip install --quiet -e '.[dev]'

dataset:
	@if [ ! -f $(FASHION_MNIST) ]; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist); \
	fi

run: install dataset
	$(VENV_PYTHON) -m distillery run --config $(RECIPE)

test: install-dev
	$(VENV_PYTHON) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check src tests

bench: install dataset
	$(VENV_PYTHON) -m distillery bench
