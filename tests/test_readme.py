"""README.md: every ```python snippet runs on its own, the API table lists every
public name, every notebook is linked, and every repository file it cites exists.

The README is found beside tests/ (the checkout, and the py313 CI leg, which
copies it into its run folder), or at $LORA_JAX_README.
"""

import glob
import os
import re

import pytest

import lora_jax as lj
import lora_jax.nnx as ljn

_HERE = os.path.dirname(os.path.abspath(__file__))
README = os.environ.get("LORA_JAX_README") or os.path.join(os.path.dirname(_HERE), "README.md")
ROOT = os.path.dirname(os.path.abspath(README))
_NOT_FOUND = f"README.md not found at {README} (set LORA_JAX_README)"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_HEADING = re.compile(r"^#+ (.+)$", re.M)


def _readme() -> str:
  if not os.path.exists(README):
    pytest.fail(_NOT_FOUND)
  with open(README, encoding="utf-8") as f:
    return f.read()


def _python_blocks() -> list[tuple[str, str]]:
  """[(id, code)]: each ```python block, named after the heading above it."""
  if not os.path.exists(README):
    return []  # test_readme_has_python_snippets fails
  text = _readme()
  blocks = []
  for m in _FENCE.finditer(text):
    if m.group(1) != "python":
      continue
    headings = _HEADING.findall(text, 0, m.start())
    name = re.sub(r"[^a-z0-9]+", "-", (headings[-1] if headings else "top").lower()).strip("-")
    blocks.append((f"{len(blocks)}-{name}", m.group(2)))
  return blocks


_BLOCKS = _python_blocks()


def test_readme_has_python_snippets():
  _readme()
  assert len(_BLOCKS) >= 7, [name for name, _ in _BLOCKS]


@pytest.mark.parametrize("code", [c for _, c in _BLOCKS], ids=[n for n, _ in _BLOCKS])
def test_snippet_runs_on_its_own(code, tmp_path, monkeypatch):
  if "from transformers" in code:
    try:
      from transformers import FlaxLlamaForCausalLM  # noqa: F401
    except ImportError as e:
      if os.environ.get("LORA_JAX_INTEROP") == "1":
        pytest.fail(f"LORA_JAX_INTEROP=1 but {e}: install lora_jax[interop].")
      pytest.skip("needs transformers 4.x with its Flax models (lora_jax[interop]); "
                  "runs on the py311 CI leg (LORA_JAX_INTEROP=1)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the snippet builds its model offline
  monkeypatch.chdir(tmp_path)  # relative paths land here; /tmp paths are moved here
  code = code.replace('"/tmp/', f'"{tmp_path}/tmp-')
  exec(compile(code, f"README.md:{code.splitlines()[0]}", "exec"), {"__name__": "readme"})


def _section(text: str, heading: str) -> str:
  start = text.index(f"\n## {heading}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else len(text)]


def test_api_table_lists_every_public_name():
  rows = [line for line in _section(_readme(), "API").splitlines() if line.startswith("| `")]
  named, nnx_named = set(), set()
  for row in rows:
    first_cell = row.split(" | ")[0]
    spans = re.findall(r"`([^`]+)`", first_cell)
    if spans[0] == "lora_jax.nnx":  # the row of the lora_jax.nnx module
      nnx_named |= {re.match(r"\w*", span).group() for span in spans[1:]}
    else:
      named |= {re.match(r"\w*", span).group() for span in spans}
  for module, names in ((lj, named), (ljn, nnx_named)):
    missing = sorted(set(module.__all__) - names)
    assert not missing, f"{module.__name__}.__all__ names missing from README's API table: {missing}"
    unknown = sorted(names - set(module.__all__))
    assert not unknown, f"README's API table names what {module.__name__} does not export: {unknown}"


def test_every_notebook_is_linked():
  text = _readme()
  notebooks = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
  assert notebooks, f"no notebooks under {ROOT}/notebooks"
  unlinked = [os.path.basename(p) for p in notebooks
              if f"](notebooks/{os.path.basename(p)})" not in text]
  assert not unlinked, f"notebooks not linked from README.md: {unlinked}"


# Names README cites that are not files of the repository: what lora_jax or
# the demo writes, and PEFT's file names.
_NOT_REPO_FILES = {"lora_jax.json", "adapter_config.json", "demo_out/loss_curves.png"}
_PATHLIKE = re.compile(
    r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.(?:md|py|ipynb|txt|json|png|sh|toml|rst|cfg)|"
    r"(?:benchmarks|ci|docs|lora_jax|notebooks|tests)/(?:[\w.-]+/)*)(?![\w/-])")


def test_cited_repository_files_exist():
  if not os.path.exists(os.path.join(ROOT, "pyproject.toml")):
    pytest.skip(f"{ROOT} is not the checkout (pyproject.toml missing)")
  text = _readme()
  links = {m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
           if not re.match(r"[a-z]+:", m)}
  cited = links | set(_PATHLIKE.findall(text))
  cited -= _NOT_REPO_FILES
  # "How it works" names modules relative to lora_jax/_src/; the GPU table
  # names scripts of benchmarks/.
  roots = (ROOT, os.path.join(ROOT, "lora_jax", "_src"), os.path.join(ROOT, "benchmarks"))
  missing = sorted(p for p in cited if not any(os.path.exists(os.path.join(r, p)) for r in roots))
  assert not missing, f"README.md cites files that are not in the repository: {missing}"
  assert len(cited) > 20, sorted(cited)  # the pattern still finds what README cites
