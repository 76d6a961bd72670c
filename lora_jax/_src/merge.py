"""merge / unmerge: fold adapters into kernels for zero-overhead inference."""

from __future__ import annotations

from typing import Any

import jax

from lora_jax._src.delta import LoraDelta, adapters, is_concrete
from lora_jax._src.dora import adapted_weight, unmerged_weight
from lora_jax._src.dora import norm as dora_norm
from lora_jax._src.paths import leaves_with_paths, map_with_paths, preview


def _combine(path: str, w: Any, d: LoraDelta, sign: float,
             norm: Any = None) -> jax.Array:
  _check_shape(path, w, d)
  out = adapted_weight(w, d) if sign > 0 else unmerged_weight(w, d, norm, path)
  # Eagerly computed results keep the base kernel's placement (under jit the
  # compiler propagates it).
  if is_concrete(w) and is_concrete(out) and out.sharding != w.sharding:
    out = jax.device_put(out, w.sharding)
  return out


def check_matches(base: Any, deltas: dict, what: str) -> None:
  """Raises, naming the leaf, unless every adapter fits a base kernel (and,
  outside unmerge, a principal-init adapter its residual base)."""
  flat = dict(leaves_with_paths(base))
  missing = [p for p in deltas if p not in flat]
  if missing:
    raise ValueError(
        f"{what}: the delta has adapters at {preview(missing)} but the base "
        f"has no leaf at those paths. Is this the adapter of another model?")
  for path, d in deltas.items():
    _check_shape(path, flat[path], d)
    if what != "unmerge":
      d.check_base(path, flat[path])


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


def _apply(params: Any, delta: Any, sign: float, what: str,
           norms: dict | None = None) -> Any:
  deltas = adapters(delta)
  check_matches(params, deltas, what)
  norms = norms or {}
  from lora_jax._src.quant import dequantize  # pylint: disable=g-import-not-at-top
  params = dequantize(params)  # a quantized base merges into float params
  return map_with_paths(
      lambda path, w: w if path not in deltas else _combine(
          path, w, deltas[path], sign, norms.get(path)), params)


def dora_norms(base: Any, delta: Any) -> dict:
  """``{path: ||W0 + s*A@B||}`` (per output unit) of every DoRA adapter; what
  :func:`unmerge` needs to undo a DoRA merge exactly.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> base, delta = lj.split({"w": jnp.eye(3) * 2}, lj.LoraConfig(
  ...     rank=1, targets="w", dora=True), jax.random.key(0))
  >>> lj.dora_norms(base, delta)["w"]
  Array([2., 2., 2.], dtype=float32)
  >>> merged = lj.merge(base, delta)
  >>> bool(jnp.allclose(lj.unmerge(merged, delta, lj.dora_norms(base, delta))["w"],
  ...                   base["w"]))
  True
  """
  flat = dict(leaves_with_paths(base))
  return {p: dora_norm(flat[p], d) for p, d in adapters(delta).items()
          if d.magnitude is not None}


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


def unmerge(params: Any, delta: Any, norms: dict | None = None) -> Any:
  """Inverse of :func:`merge`: subtracts ``scale * a @ b`` again.

  Exact up to float rounding (two roundings into the base dtype). DoRA
  adapters also need ``norms = dora_norms(base, delta)``, taken before merging.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = {"kernel": lj.LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)))}
  >>> base = {"kernel": jnp.zeros((3, 2))}
  >>> float(abs(lj.unmerge(lj.merge(base, d), d)["kernel"]).max())
  0.0
  """
  return _apply(params, delta, -1.0, "unmerge", norms)
