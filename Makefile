# Set-up and the two commands the README starts with. `make test` is what CI runs (.ci/run).
# TORCH: the torch requirement installed first, before anything can pull a CUDA build in.
# Elsewhere: `make test TORCH=torch` (or a CUDA build) and, for the CPU wheel, PIP_EXTRA_INDEX_URL.
PYTHON ?= python3
TORCH ?= torch==2.13.0+cpu
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-all bench clean

# The test-only libraries (transformers, x-transformers, torchdata; litgpt without its dependencies) are installed
# against $(VENV)/constraints.txt: constraints.txt plus a pin on the torch that was just installed, whatever TORCH
# named, so none of them can replace it (a plain `torch` requirement would resolve to a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	cp constraints.txt $(VENV)/constraints.txt
	$(PY) -W ignore -c 'import torch; print("torch==" + torch.__version__)' >> $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e '.[test,real]'
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt --no-deps litgpt
	$(PY) -W ignore -c 'import sys, torch; pin = open("$(VENV)/constraints.txt").read().split("\ntorch==")[-1].strip(); \
	    sys.exit(0 if torch.__version__ == pin else f"torch changed during the install: {pin} -> {torch.__version__}")'
	touch $@

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m ruff check lightning_recipe tests benchmarks examples
	$(PY) -m ruff format --check lightning_recipe tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest -m "slow or not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/check_cost.py

clean:
	rm -rf $(VENV) lightning_logs recipe_logs
