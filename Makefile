# Two entry points: `make train` and `make test`. Both create .venv on first use
# and install jaxloc with its [tfds] and [dev] extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= experiments/configs/digit.py
WORKDIR ?= runs/digit
ARGS ?=

.PHONY: train test lint benchmark clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[tfds,dev]'
	touch $@

train: $(VENV)/.installed
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests $(ARGS)

benchmark: $(VENV)/.installed
	$(PY) -m experiments.benchmark $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
