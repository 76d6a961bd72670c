"""One predicate for "a float array": ``jnp.issubdtype(dtype, jnp.floating)``.

numpy's own ``np.issubdtype(bfloat16, np.floating)`` is False (bfloat16 is
an extension type to numpy), and bf16 is the default dtype of Gemma3 and
Qwen3: every "is this a float kernel" question goes through here.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def is_float_dtype(dtype: Any) -> bool:
  """Whether ``dtype`` is a real floating dtype (bf16, f16, f32, f64, ...)."""
  return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def is_float(x: Any) -> bool:
  """Whether ``x`` has a real floating dtype (arrays, ShapeDtypeStructs,
  QArrays: the dtype they stand for)."""
  return is_float_dtype(getattr(x, "dtype", None))


def is_float_matrix(x: Any) -> bool:
  """A float with at least two axes: what could be a kernel."""
  return is_float(x) and len(getattr(x, "shape", ())) >= 2
