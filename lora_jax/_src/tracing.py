"""Tracing an apply function to a jaxpr, and evaluating jaxpr equations.

Only public API: ``jax.make_jaxpr`` and ``jax.extend.core``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def trace(fn: Callable, params: Any, args: tuple, kwargs: dict):
  """``jax.make_jaxpr`` of ``fn(params, *args, **kwargs)``.

  Array leaves of ``args``/``kwargs`` become inputs; every other leaf (Python
  bools such as ``deterministic=True``, strings, ...) stays static, as it would
  be under ``jit`` with static arguments. Returns ``(closed_jaxpr, inputs,
  out_tree)`` where ``inputs`` are the flat values for the jaxpr's invars
  (params' leaves first, in ``tree_leaves`` order).
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(leaves) if _is_array(x)]

  def flat_fn(p, dyn):
    full = list(leaves)
    for i, x in zip(dynamic, dyn):
      full[i] = x
    a, k = jax.tree.unflatten(treedef, full)
    return fn(p, *a, **k)
  dyn = [leaves[i] for i in dynamic]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(params, dyn)
  inputs = jax.tree.leaves(params) + dyn
  return closed, inputs, jax.tree.structure(out_shape)


def bind_eqn(eqn, invals: list) -> list:
  """Evaluates one equation on concrete values or tracers; returns a list."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
    invals = [*subfuns, *invals]
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is not None:
    with ctx:
      out = eqn.primitive.bind(*invals, **bind_params)
  else:
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]
