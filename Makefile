# Everything runs in local virtualenvs that these targets create.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test test-oldest test-newest check docs bench sweep clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m lora_jax demo

# What CI runs: the whole suite twice (ci/leg.sh), on CPython 3.11 with the
# oldest supported releases and on CPython 3.13 with the newest, from a wheel.
test: test-oldest test-newest

test-oldest:
	bash ci/leg.sh py311-oldest

test-newest:
	bash ci/leg.sh py313-newest

# The suite once, in .venv with $(PYTHON): the quick loop while developing.
check: setup
	$(BIN)/python -m pytest

docs: setup
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	$(BIN)/python -m sphinx -W -b html docs docs/_build/html

bench: setup
	$(BIN)/python benchmarks/w1.py
	$(BIN)/python benchmarks/w1.py --arch flax_scan --variants forward,merged_forward,floor,full,merge,factored,auto

sweep: setup
	$(BIN)/python benchmarks/sweep.py

clean:
	rm -rf $(VENV) .venv-ci311 .venv-ci313 demo_out docs/_build .pytest_cache
