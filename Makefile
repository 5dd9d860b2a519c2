# Set-up and the two commands the README starts with. `make test` is what CI runs (.ci/run).
# TORCH: the torch requirement installed first, before anything can pull a CUDA build in.
# Elsewhere: `make test TORCH=torch` (or a CUDA build) and, for the CPU wheel, PIP_EXTRA_INDEX_URL.
PYTHON ?= python3
TORCH ?= torch==2.13.0+cpu
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest -m "slow or not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/check_cost.py

clean:
	rm -rf $(VENV) lightning_logs recipe_logs
