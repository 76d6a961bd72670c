#!/usr/bin/env bash
# One CI leg: its own virtualenv, then the whole suite (tests, doctests over
# lora_jax/, the notebooks). `make test` runs both legs.
#
#   bash ci/leg.sh py311-oldest   CPython 3.11 with the oldest releases that
#       pyproject.toml allows (pinned by ci/oldest.txt), editable install, and
#       the PyTorch/PEFT interop tests (the `interop` extra) when it is declared.
#   bash ci/leg.sh py313-newest   CPython 3.13 with the newest releases on PyPI,
#       lora_jax installed from a wheel built here; the tests run outside the
#       checkout so they exercise the wheel; the API reference is built (-W).
#
# The interpreters come from pyenv (`pyenv prefix 3.11`), or from PYTHON311 /
# PYTHON313 when set. A missing interpreter fails the leg: nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LEG=${1:?usage: ci/leg.sh py311-oldest|py313-newest [setup|run]}
# setup: the leg's virtualenv only; run: the tests in the virtualenv that a
# setup of this checkout left (.ci/run builds both legs' while other steps
# run); neither: both, one after the other.
PHASE=${2:-all}
export JAX_PLATFORMS=cpu PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

start=$SECONDS
say() { printf '\n=== [%s, %d s] %s\n' "$LEG" "$((SECONDS - start))" "$*"; }
die() { printf '\n*** [%s] FAILED: %s\n' "$LEG" "$*" >&2; exit 1; }

interpreter() {  # $1 = "3.11": the path of that CPython, or die
  local var="PYTHON${1/./}" prefix
  if [ -n "${!var:-}" ]; then
    [ -x "${!var}" ] || die "$var=${!var} is not an executable"
    echo "${!var}"; return
  fi
  command -v pyenv >/dev/null || die "pyenv not found; install CPython $1 with pyenv or set $var"
  prefix=$(pyenv prefix "$1" 2>/dev/null) || die "CPython $1 is not installed (pyenv install $1), or set $var"
  [ -x "$prefix/bin/python$1" ] || die "no $prefix/bin/python$1"
  echo "$prefix/bin/python$1"
}

pip_in() {  # pip of venv $1, quiet; drops this machine's notes on empty local indexes
  local venv=$1; shift
  "$venv/bin/python" -m pip -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

fresh_venv() {  # $1 = python, $2 = venv dir
  rm -rf "$2"
  "$1" -m venv "$2"
  pip_in "$2" install --upgrade pip
}

print_versions() {  # the versions this leg really ran
  "$1" - <<'EOF'
import importlib.metadata as md, platform
names = ["jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy",
         "torch", "peft", "transformers", "sphinx", "google-tunix", "qwix",
         "lora_jax"]
print(f"  {'python':18s} {platform.python_version()}")
for n in names:
  try:
    print(f"  {n:18s} {md.version(n)}")
  except md.PackageNotFoundError:
    if n not in ("torch", "peft", "transformers", "sphinx", "google-tunix", "qwix"):
      raise SystemExit(f"{n} is not installed")
EOF
}

FAILED=()  # steps that failed; the leg runs them all, then fails if any did

run_pytest() {  # pytest "$@"; any non-zero exit fails the leg, 5 (no test ran) too
  local rc=0
  "$PY" -m pytest -p no:cacheprovider -q -rfE --durations=10 -n "${JOBS:-auto}" --dist loadfile "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then FAILED+=("pytest exited 5: no tests ran")
  elif [ "$rc" -ne 0 ]; then FAILED+=("pytest exited $rc")
  fi
}

has_extra() {  # is [project.optional-dependencies] $1 declared in pyproject.toml?
  "$PY" -c "import sys, tomllib; d = tomllib.load(open('pyproject.toml', 'rb'));
sys.exit(0 if sys.argv[1] in d['project'].get('optional-dependencies', {}) else 1)" "$1"
}

ready() {  # $1 = venv: the setup phase finished there, for this checkout
  [ "$(cat "$1/.leg-ready" 2>/dev/null)" = "$(git rev-parse HEAD 2>/dev/null || echo none)" ]
}

mark_ready() {
  git rev-parse HEAD 2>/dev/null > "$1/.leg-ready" || echo none > "$1/.leg-ready"
}

oldest() {
  local venv=.venv-ci311 extras=test,demo
  PY=$(interpreter 3.11)
  has_extra interop && extras=$extras,interop
  if [ "$PHASE" = run ]; then
    ready "$venv" || die "no setup of this checkout in $venv: run 'ci/leg.sh $LEG setup' first"
    say "venv $venv: set up earlier for this checkout"
  else
    say "venv $venv: $PY, pip install -c ci/oldest.txt -e .[$extras]"
    fresh_venv "$PY" "$venv"
    pip_in "$venv" install -c ci/oldest.txt -e ".[$extras]"
    "$venv/bin/python" -m pip check >/dev/null || die "pip check: $("$venv/bin/python" -m pip check)"
    mark_ready "$venv"
    [ "$PHASE" = setup ] && return 0
  fi
  PY=$ROOT/$venv/bin/python
  say "versions"; print_versions "$PY"
  "$PY" - <<'EOF' || die "installed versions differ from ci/oldest.txt"
import importlib.metadata as md
for line in open("ci/oldest.txt"):
  line = line.split("#")[0].strip()
  if line:
    name, version = line.split("==")
    assert md.version(name) == version, (name, md.version(name), version)
EOF
  if [[ $extras == *interop* ]]; then
    export LORA_JAX_INTEROP=1  # the interop tests fail, not skip, without torch
    say "interop tests (PyTorch/PEFT): run in THIS leg, LORA_JAX_INTEROP=1"
  else
    say "interop tests: no 'interop' extra in pyproject.toml, none to run"
  fi
  # Notebooks 01-05 and every README snippet run here too (the oldest JAX
  # is where they break first); notebook 06 needs tunix, which this leg
  # does not install (py313-newest runs it); tests/test_demo.py runs in
  # `make test`, beside `make demo`.
  say "pytest: tests/, doctests over lora_jax/ (checkout, editable), notebooks 01-05, the README's snippets; NOT notebook 06 (tunix: py313-newest), tests/test_demo.py (make test)"
  run_pytest --ignore=tests/test_demo.py -k "not 06_tunix"
}

newest_setup() {  # the venv, the wheel built from the checkout, installed
  say "venv $venv: $PY; wheel built from the checkout, newest releases from PyPI"
  fresh_venv "$PY" "$venv"
  pip_in "$venv" wheel --no-deps --wheel-dir "$work/dist" .
  wheel=$(ls "$work"/dist/lora_jax-*.whl)
  say "wheel $(basename "$wheel"): every tracked lora_jax/*.py is in it"
  "$venv/bin/python" - "$wheel" $(git ls-files 'lora_jax/*.py') <<'EOF' || die "the wheel lacks files"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = [p for p in sys.argv[2:] if p not in names]
assert not missing, f"not in the wheel: {missing}"
assert "lora_jax/examples/multihost.py" in names and "lora_jax/_src/__init__.py" in names
print(f"  {len(sys.argv) - 2} package files, all present")
EOF
  local extras=test,demo,docs
  has_extra tunix && extras=$extras,tunix
  pip_in "$venv" install --upgrade --upgrade-strategy eager "$wheel[$extras]"
  "$venv/bin/python" -m pip check >/dev/null || die "pip check: $("$venv/bin/python" -m pip check)"
  if [[ $extras == *tunix* ]]; then
    # After pip check: google-tunix declares heavy dependencies (TF datasets,
    # grain, transformers, ...) that the modules the tests use do not import;
    # the `tunix` extra holds those they do.
    say "google-tunix==0.1.7 --no-deps; its model, trainer and sampler import"
    pip_in "$venv" install --no-deps google-tunix==0.1.7
    "$venv/bin/python" -c "import tunix.models.qwen3.model, tunix.models.gemma3.model, \
tunix.sft.peft_trainer, tunix.generate.sampler, qwix" || die "tunix does not import"
  fi
  mark_ready "$venv"
}

newest() {
  local venv=.venv-ci313 work wheel pkg
  PY=$(interpreter 3.13)
  work=$(mktemp -d "${TMPDIR:-/tmp}/lora_jax-ci313.XXXXXX")
  if [ "$PHASE" = run ]; then
    ready "$venv" || die "no setup of this checkout in $venv: run 'ci/leg.sh $LEG setup' first"
    say "venv $venv: set up earlier for this checkout"
  else
    newest_setup
    [ "$PHASE" = setup ] && return 0
  fi
  PY=$ROOT/$venv/bin/python
  say "versions"; print_versions "$PY"
  say "interop tests: not in this leg (no PyTorch on Python 3.13 here)"
  if has_extra tunix; then
    export LORA_JAX_TUNIX=1  # the tunix tests and notebook fail, not skip, without it
    say "tunix tests (lora_jax.nnx in tunix's trainer and sampler): run in THIS leg, LORA_JAX_TUNIX=1"
  else
    say "tunix tests: no 'tunix' extra in pyproject.toml, none to run"
  fi

  # The suite runs from a directory with no lora_jax/ in it, so every import
  # (tests, doctests, notebooks, subprocesses) resolves to the installed wheel.
  mkdir -p "$work/run"
  cp -r tests notebooks docs benchmarks README.md "$work/run/"  # notebook 03 plots
  # benchmarks/results; the demo's W3 line builds its model with benchmarks/w3.py;
  # tests/test_readme.py runs README.md's snippets
  "$PY" - "$work/run/pytest.ini" <<'EOF'  # pyproject's pytest options, less its paths
import sys, tomllib
opts = tomllib.load(open("pyproject.toml", "rb"))["tool"]["pytest"]["ini_options"]
opts.pop("testpaths", None)
with open(sys.argv[1], "w") as f:
  f.write("[pytest]\n")
  for k, v in opts.items():
    f.write(f"{k} =" + "".join(f"\n  {x}" for x in v) + "\n" if isinstance(v, list)
            else f"{k} = {v}\n")
EOF
  cd "$work/run"
  pkg=$("$PY" -c "import lora_jax, os; print(os.path.dirname(lora_jax.__file__))")
  say "lora_jax imported from $pkg"
  [[ $pkg == "$ROOT/$venv/lib/"*"/site-packages/lora_jax" ]] || die "lora_jax is not the installed wheel"
  export LORA_JAX_EXPECT_DIR=$pkg  # tests/conftest.py checks it again
  "$PY" -m lora_jax.examples.multihost --help >/dev/null || die "python -m lora_jax.examples.multihost"
  say "pytest: tests/, doctests over the installed lora_jax, notebook 06 (wheel); NOT tests/test_readme.py and notebooks 01-05 (run by make test; py311-oldest runs the PyTorch snippet), tests/test_demo.py (run by make test, beside make demo)"
  local nb=tests/test_notebooks.py::test_notebook_runs
  run_pytest tests "$pkg" --doctest-modules --ignore=tests/test_readme.py \
    --ignore=tests/test_demo.py --deselect "$nb[01_quickstart_linen.ipynb]" \
    --deselect "$nb[02_nnx.ipynb]" --deselect "$nb[03_engines_and_performance.ipynb]" \
    --deselect "$nb[04_sharding.ipynb]" --deselect "$nb[05_many_adapters.ipynb]"
  say "API reference: sphinx -W (autodoc imports the installed wheel)"
  if "$PY" -m sphinx -W --keep-going -q -b html docs "$work/html"; then
    echo "  built $work/html/index.html"
  else
    FAILED+=("sphinx-build -W")
  fi
  cd "$ROOT"
}

trap 'echo "=== [$LEG] took $((SECONDS - start)) s wall; CPU (user sys) of the script, then of its processes:"; times' EXIT
case $PHASE in
  all|setup|run) ;;
  *) die "unknown phase '$PHASE' (setup, run, or none for both)" ;;
esac
case $LEG in
  py311-oldest) oldest ;;
  py313-newest) newest ;;
  *) die "unknown leg '$LEG'" ;;
esac
[ ${#FAILED[@]} -eq 0 ] || die "$(IFS=';'; echo "${FAILED[*]}")"
if [ "$PHASE" = setup ]; then say "set up"; else say "passed"; fi
