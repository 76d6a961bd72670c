"""Sphinx configuration of the lora_jax API reference.

Autodoc imports the installed lora_jax (`pip install -e .[docs]` or a wheel):
this file does not put the checkout on sys.path, so CI documents exactly what
it installed. Build with `make docs` (warnings are errors).
"""

import importlib.metadata

project = "lora_jax"
author = "lora_jax authors"
release = importlib.metadata.version("lora_jax")
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" as fields of the class, not as entries that `members` repeats.
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}

html_theme = "alabaster"
html_title = f"lora_jax {release}"
