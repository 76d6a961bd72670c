"""merge / unmerge: fold adapters into kernels for zero-overhead inference."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.delta import LoraDelta, deltas_by_path, delta_weight
from lora_jax.paths import leaves_with_paths, map_with_paths, preview


def _combine(path: str, w: Any, d: LoraDelta, sign: float) -> jax.Array:
  _check_shape(path, w, d)
  # Add in the wider of the two dtypes, then round once into the base dtype.
  dtype = jnp.result_type(w.dtype, d.a.dtype, d.b.dtype)
  out = (w.astype(dtype) + sign * delta_weight(d, dtype)).astype(w.dtype)
  # Eagerly computed results keep the base kernel's placement (under jit the
  # compiler propagates it).
  concrete = lambda x: isinstance(x, jax.Array) and not isinstance(
      x, jax.core.Tracer)
  if concrete(w) and concrete(out) and out.sharding != w.sharding:
    out = jax.device_put(out, w.sharding)
  return out


def check_matches(base: Any, deltas: dict, what: str) -> None:
  """Raises, naming the leaf, unless every adapter fits a base kernel."""
  flat = dict(leaves_with_paths(base))
  missing = [p for p in deltas if p not in flat]
  if missing:
    raise ValueError(
        f"{what}: the delta has adapters at {preview(missing)} but the base "
        f"has no leaf at those paths. Is this the adapter of another model?")
  for path, d in deltas.items():
    _check_shape(path, flat[path], d)


def _check_shape(path: str, w: Any, d: LoraDelta) -> None:
  shape = tuple(getattr(w, "shape", ()))
  try:
    want = d.kernel_shape
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"The adapter at {path!r} is malformed: {e}") from None
  if shape != tuple(want):
    raise ValueError(
        f"Adapter/base mismatch at {path!r}: the adapter updates a kernel of "
        f"shape {tuple(want)} (a {tuple(d.a.shape)}, b {tuple(d.b.shape)}), "
        f"the base leaf has shape {shape}. Was the adapter trained on another "
        f"model or config?")


def _apply(params: Any, delta: Any, sign: float, what: str) -> Any:
  deltas = deltas_by_path(delta)
  check_matches(params, deltas, what)
  return map_with_paths(
      lambda path, w: w if path not in deltas else _combine(
          path, w, deltas[path], sign), params)


def merge(base: Any, delta: Any) -> Any:
  """``base`` with ``W0 + scale * a @ b`` at every adapted kernel.

  The result has the structure, dtypes and (for concrete arrays) shardings of
  ``base``; the update is added in the factors' precision and rounded once.
  Adapters are matched to base leaves by path, so a delta loaded with
  :func:`lora_jax.load` merges into the model it was trained on.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> base = {"kernel": jnp.zeros((3, 2))}
  >>> d = lj.LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)), scale=2.0,
  ...                  layout=lj.Layout.dense())
  >>> lj.merge(base, {"kernel": d})["kernel"]
  Array([[2., 2.],
         [2., 2.],
         [2., 2.]], dtype=float32)
  """
  return _apply(base, delta, 1.0, "merge")


def unmerge(params: Any, delta: Any) -> Any:
  """Inverse of :func:`merge`: subtracts ``scale * a @ b`` again.

  Exact up to float rounding (two roundings into the base dtype).

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = {"kernel": lj.LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)))}
  >>> base = {"kernel": jnp.zeros((3, 2))}
  >>> float(abs(lj.unmerge(lj.merge(base, d), d)["kernel"]).max())
  0.0
  """
  return _apply(params, delta, -1.0, "unmerge")
