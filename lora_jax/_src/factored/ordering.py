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
``min(popcount(bits of two elements of the anchor), 0)`` reduced in the
values' dtype, which is 0 for every bit pattern (a population count is never
negative: NaN, inf and -0.0 give 0 like any other number). Floats get ``x - 0.0``, exact for every float
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


def _counts(anchor: Any) -> jax.Array | None:
  """Population counts (int32, each in ``[0, bits]``) of a few elements of
  ``anchor``: computed only once ``anchor`` exists."""
  x = _anchor_elements(anchor)
  if x is None:
    return None
  if jnp.issubdtype(x.dtype, jnp.inexact):
    x = jax.lax.bitcast_convert_type(x, _bits_dtype(x.dtype))
  return jax.lax.population_count(x).astype(jnp.int32)


def _zero(counts: jax.Array, dtype) -> jax.Array:
  """A scalar 0 of ``dtype`` from ``counts``: ``min(min(counts, 0))``, with
  the clamp and the cast *inside* the reduction. XLA copies a scalar's
  producers into every fusion that reads the values made to wait (a few
  per root, each read by several fusions of the backward pass); from a
  reduction's result it copies only a broadcast, where a clamp and a cast
  after the reduction were copied too (W1: 173 optimised HLO instructions of
  7629)."""
  return jnp.min(jnp.minimum(counts, 0).astype(dtype))


def _tie(x: jax.Array, counts: jax.Array, zeros: dict) -> jax.Array:
  """``x`` unchanged, made to wait for ``counts``: integers (quantized
  codes) ``x ^ 0``, floats ``x - (+0.0)`` (exact for every float, ``-0.0``,
  inf and NaN included, where ``x + 0.0`` turns ``-0.0`` into ``+0.0``; an
  add fuses where a bitcast may not). Bool and complex leaves have no bits
  to thread through and are left as they are. ``zeros``: one zero per dtype,
  shared by the leaves."""
  dtype = jnp.dtype(x.dtype)
  integer = jnp.issubdtype(dtype, jnp.integer)
  if not (integer or jnp.issubdtype(dtype, jnp.floating)):
    return x
  if dtype not in zeros:
    zeros[dtype] = _zero(counts, dtype)
  return x ^ zeros[dtype] if integer else x - zeros[dtype]


def after(values: Any, anchor: Any) -> Any:
  """``values`` (a pytree), bit for bit, computed after ``anchor`` exists.

  Every array leaf of ``values`` is returned unchanged whatever ``anchor``
  holds (NaN and inf included); the dependency is on the schedule only. A
  NaN comes back a NaN, its payload as float arithmetic leaves it (JAX 0.12
  canonicalises float8_e5m2's; ``tests/test_ordering.py``).
  """
  values, anchor = jax.lax.optimization_barrier((values, anchor))
  counts = _counts(anchor)
  if counts is None:
    return values
  zeros: dict = {}
  return jax.tree.map(lambda v: _tie(v, counts, zeros), values)
