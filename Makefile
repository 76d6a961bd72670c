# Everything runs in a local virtualenv that these targets create.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test bench sweep clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m lora_jax demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/w1.py
	$(BIN)/python benchmarks/w1.py --arch flax_scan --variants forward,merged_forward,floor,full,merge,factored,auto

sweep: setup
	$(BIN)/python benchmarks/sweep.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
