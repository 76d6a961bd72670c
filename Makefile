# Everything runs in local virtualenvs that these targets create.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# pytest workers: one per core (pytest-xdist); JOBS=1 runs in one process.
JOBS   ?= auto

.PHONY: setup demo test lint ci ci-oldest ci-newest docs bench sweep clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo,lint]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m lora_jax demo

# The README's test command: the whole suite (tests, doctests over lora_jax/,
# notebooks) once, in .venv with $(PYTHON); needs only python3 >= 3.11.
test: setup
	$(BIN)/python -m pytest -p no:cacheprovider -q -n $(JOBS) --dist loadfile

# ruff and mypy, configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check lora_jax tests benchmarks
	$(BIN)/mypy

# The two pinned legs (ci/leg.sh), which .ci/run adds to `make test`:
# CPython 3.11 with the oldest supported releases and CPython 3.13 with the
# newest, from a wheel. They need both interpreters (pyenv, or PYTHON311 and
# PYTHON313).
# LEG_PHASE=run: use the virtualenvs that `ci/leg.sh LEG setup` made for this
# commit (what .ci/run does, building them while the other steps run).
LEG_PHASE ?=

ci: ci-oldest ci-newest

ci-oldest:
	bash ci/leg.sh py311-oldest $(LEG_PHASE)

ci-newest:
	bash ci/leg.sh py313-newest $(LEG_PHASE)

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
