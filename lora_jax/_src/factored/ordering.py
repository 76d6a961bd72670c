"""Ordering without data: values made to wait for another value, unchanged.

Two places in the engine must tell XLA *when* to compute something, not what:

* a narrow frozen kernel (a :class:`QArray`, a bf16 kernel the program widens)
  is widened where it is used, after the activation it multiplies exists;
  otherwise XLA:CPU hoists every layer's widening to the start of the step
  and all the float copies are live at once (``frozen.frozen_linear``);
* a recomputed region runs in the backward pass, after the cotangent exists;
  otherwise XLA merges it with the forward pass's identical computation and
  keeps its result after all (``recompute``).

``lax.optimization_barrier`` says this on GPU and TPU, but XLA:CPU removes
barriers before scheduling and common-subexpression elimination. So
:func:`after` also threads a zero through the values: the zero is
``min(popcount(bits of two elements of the anchor), 0)``, which is 0 for every
bit pattern (a population count is never negative: NaN, inf and -0.0 give 0
like any other number). Floats get ``x - 0.0``, exact for every float
(``-0.0``, inf and NaN included), integers (quantized codes) ``x ^ 0``. No
output depends on any value of the anchor; only the schedule does. XLA cannot
fold the zero (it does not reason about the range of a population count), so
the dependency survives to the schedule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc


def _anchor_elements(anchor: Any) -> jax.Array | None:
  """A few elements read from ``anchor``'s first non-empty numeric leaf: its
  first two (one if it has one), or under Explicit mesh axes, where one
  element of a sharded axis cannot be sliced out by type, the first element
  of each shard of the sharded axes (the rest of the work reduces them).

  Two, not one: XLA simplifies a reduction over one element away, and then
  copies the whole bitcast, population count, min and convert into every
  fusion that reads a value made to wait (19 copies per decoder layer of
  ``benchmarks/qwen3.py``, a tenth of the factored step's optimised HLO, a
  cost paid at every compile). A reduction over two stays one small fusion
  whose scalar the waiting values read."""
  for x in jax.tree.leaves(anchor):
    dtype = jnp.dtype(x.dtype)
    if x.size and (jnp.issubdtype(dtype, jnp.inexact)
                   or jnp.issubdtype(dtype, jnp.integer)) and not (
                       jnp.issubdtype(dtype, jnp.complexfloating)):
      spec = jc.type_spec(x)
      if spec is None or not any(spec):
        return jnp.ravel(x)[:2]
      return x[tuple(slice(None) if s else 0 for s in spec)]
  return None


def _bits_dtype(dtype) -> jnp.dtype:
  return jnp.dtype(f"int{8 * jnp.dtype(dtype).itemsize}")


def zero_after(anchor: Any) -> jax.Array | None:
  """An int32 0 that XLA computes only once ``anchor`` exists (None when the
  anchor has no numeric element to wait for)."""
  x = _anchor_elements(anchor)
  if x is None:
    return None
  if jnp.issubdtype(x.dtype, jnp.inexact):
    x = jax.lax.bitcast_convert_type(x, _bits_dtype(x.dtype))
  count = jax.lax.population_count(x).astype(jnp.int32)  # in [0, bits]
  return jnp.minimum(jnp.min(count), 0)


def _xor(x: jax.Array, zero: jax.Array) -> jax.Array:
  dtype = jnp.dtype(x.dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return x ^ zero.astype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    # x - (+0.0) is x for every float, -0.0, inf and NaN included (x + 0.0
    # would turn -0.0 into +0.0); an add fuses where a bitcast may not
    return x - zero.astype(dtype)
  return x  # bool, complex: no bits to thread through; left as they are


def after(values: Any, anchor: Any) -> Any:
  """``values`` (a pytree), bit for bit, computed after ``anchor`` exists.

  Every array leaf of ``values`` is returned unchanged whatever ``anchor``
  holds (NaN and inf included); the dependency is on the schedule only.
  """
  values, anchor = jax.lax.optimization_barrier((values, anchor))
  zero = zero_after(anchor)
  if zero is None:
    return values
  return jax.tree.map(lambda v: _xor(v, zero), values)
