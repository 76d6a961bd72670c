"""Every notebook runs top to bottom (outputs are not kept in git)."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) == 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      "commit notebooks with outputs stripped")
  env_flags = os.environ.pop("XLA_FLAGS", None)  # the kernel sets its own
  try:
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  finally:
    if env_flags is not None:
      os.environ["XLA_FLAGS"] = env_flags
  assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
