"""The API reference (docs/, built by CI with warnings as errors) lists every public name."""

import glob
import os
import re

import lora_jax as lj

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
_DIRECTIVE = re.compile(
    r"^\.\. (?:auto(?:function|class|exception|data)|data)::\s+(?:lora_jax\.)?(\w+)\s*$", re.M)


def _documented() -> list[str]:
  names = []
  for path in sorted(glob.glob(os.path.join(DOCS, "*.rst"))):
    with open(path, encoding="utf-8") as f:
      names += _DIRECTIVE.findall(f.read())
  return names


def test_api_reference_lists_exactly_the_public_names():
  documented = _documented()
  assert set(documented) == set(lj.__all__), (
      f"in __all__ but not in docs/: {sorted(set(lj.__all__) - set(documented))}; "
      f"in docs/ but not in __all__: {sorted(set(documented) - set(lj.__all__))}")
  assert len(documented) == len(set(documented)), "a name is documented twice"


def test_every_public_name_has_a_docstring():
  undocumented = [n for n in lj.__all__
                  if n != "ALL_LINEAR" and not (getattr(lj, n).__doc__ or "").strip()]
  assert undocumented == []
