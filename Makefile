# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RECIPE ?= src/distillery/recipes/fmnist.yaml

.PHONY: install install-dev dataset run test lint bench

# torch==2.13.0 first: it is the CPU build; a plain `torch` requirement would pull a CUDA build.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e .

install-dev: install
	$(PYTHON) -m pip install --quiet -e '.[dev]'

dataset:
	@if [ ! -f $(FASHION_MNIST) ]; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist); \
	fi

run: install dataset
	$(PYTHON) -m distillery run --config $(RECIPE)

test: install-dev
	$(PYTHON) -m pytest

lint: install-dev
	ruff check src tests

bench: install dataset
	$(PYTHON) -m distillery bench
