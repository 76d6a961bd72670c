"""Every notebook runs top to bottom (outputs are not kept in git)."""

import glob
import importlib.util
import json
import os
import sys

from nbclient import NotebookClient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def _execute(nb, cwd):
  env_flags = os.environ.pop("XLA_FLAGS", None)  # the kernel sets its own
  try:
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": cwd}}).execute()
  finally:
    if env_flags is not None:
      os.environ["XLA_FLAGS"] = env_flags


def test_there_are_notebooks():
  assert len(NOTEBOOKS) == 6


def test_kernel_runs_this_python_and_this_lora_jax(tmp_path):
  # CI runs each leg's notebooks in that leg's venv, on the lora_jax under test.
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
      "import json, os, sys, importlib.util\n"
      "spec = importlib.util.find_spec('lora_jax')\n"
      "print(json.dumps([sys.executable, os.path.dirname(spec.origin)]))")])
  _execute(nb, str(tmp_path))
  kernel_python, kernel_lora_jax = json.loads(nb.cells[0].outputs[0]["text"])
  here = os.path.dirname(importlib.util.find_spec("lora_jax").origin)
  assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
  assert os.path.realpath(kernel_lora_jax) == os.path.realpath(here)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  if os.path.basename(path).startswith("06_tunix") and not importlib.util.find_spec("tunix"):
    # as tests/test_tunix.py: runs on the py313 CI leg, which promises tunix
    if os.environ.get("LORA_JAX_TUNIX") == "1":
      pytest.fail("LORA_JAX_TUNIX=1 but tunix is not installed: install "
                  "lora_jax[tunix] and google-tunix==0.1.7 --no-deps (ci/leg.sh).")
    pytest.skip("needs tunix; runs on the py313 CI leg (LORA_JAX_TUNIX=1)")
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      "commit notebooks with outputs stripped")
  _execute(nb, os.path.dirname(path))
  assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
