# Two entry points: `make train` and `make test`. Both create .venv on first use and
# install jaxloc with its [tfds] and [dev] extras, and [cuda] (JAX's CUDA 12 wheels) when
# `nvidia-smi` finds a GPU; ACCEL=cpu|cuda|tpu chooses instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= experiments/configs/digit.py
WORKDIR ?= runs/digit
ARGS ?=
ACCEL ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
comma := ,
EXTRAS := tfds,dev$(if $(filter cpu,$(ACCEL)),,$(comma)$(ACCEL))
INSTALLED := $(VENV)/.installed-$(ACCEL)

.PHONY: train test lint benchmark clean-venv

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -c "import jax; print('jax', jax.__version__, 'sees', jax.devices())"
	touch $@

train: $(INSTALLED)
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

# The suite on up to 4 cores (pytest-xdist): it is mostly XLA compiling, one core a test;
# an idle worker takes tests queued for a busy one (worksteal), so no core waits at the end.
test: $(INSTALLED)
	$(PY) -m pytest tests -n auto --maxprocesses=4 --dist worksteal $(ARGS)

benchmark: $(INSTALLED)
	$(PY) -m experiments.benchmark $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
