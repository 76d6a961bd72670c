"""Kernels that read the same input (q, k, v; gate and up) get their
``x @ a`` in one matmul against the concatenated ``a``s: one pass over ``x``
forward and one for the gradients, instead of one per kernel. In a mixed
batch run whole (per-row factors), one batched product over rows against the
concatenated per-row ``a``s."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored.lowrank import as_matrix
from lora_jax._src.factored.lowrank import project
from lora_jax._src.factored.lowrank import reuse
from lora_jax._src.factored.values import Context


def projection(eqn, ins, ctx: Context, rows: tuple | None):
  """``(x var, contraction, x's row axis, kernel)`` if ``eqn`` is ``x @
  kernel`` taking the 2-D fast path of ``lowrank_dot`` (or, for per-row
  factors, the batched product over rows; ``rows``: the dot's row axes) with
  a plain (no DoRA, no dropout) adapter that the engine would factor; else
  None. ``ins``: the operands' abstract values (:class:`plan.Kernel` or
  None), before evaluation. Equations with the same first three entries
  form a group."""
  if eqn.primitive not in jc.DOT:
    return None
  dims = jc.dot_dims(eqn)
  lhs, rhs = eqn.invars
  if (dims.lhs_batch or dims.rhs_batch or jc.is_literal(lhs)
      or jc.is_literal(rhs)):
    return None
  x, kernel = ins
  if kernel is None or x is not None:  # x @ kernel, x no kernel
    return None
  nd = len(lhs.aval.shape)
  lc = dims.lhs_contract
  r = None
  if kernel.rows:  # x's row axis, a free axis of x
    if not rows:
      return None
    r = rows[0]
    if not isinstance(r, int) or rows[1] is not None or r >= nd - len(lc):
      return None
  lay = kernel.layout
  if (kernel.dora or ctx.dropping(kernel) or lay.batch
      or set(lay.inputs) != set(dims.rhs_contract)
      or lc != tuple(range(nd - len(lc), nd))):
    return None
  if (not kernel.rows and ctx.choose is not None
      and ctx.choose(tuple(lhs.aval.shape), lc, kernel) == "merge"):
    return None
  return lhs, lc, r, kernel


def project_group(group, x, r: int | None = None, known=None) -> tuple:
  """``({index: scale * x @ a}, product)`` for the group's equations,
  computed in one matmul against the concatenated ``a``s; ``product`` is
  that matmul's result, which a later call given it as ``known`` reuses
  (:func:`lowrank.reuse`) instead of multiplying again. With per-row
  factors (``r``: x's row axis): ``(rows, M, rank)`` each, one batched
  product over rows, and ``known`` must be None."""
  dtype = jnp.result_type(x.dtype, *(lora.a.dtype for _, _, lora in group))
  perms = []
  for _, eqn, lora in group:
    in_a, _, r_a, _ = lora.layout.factor_positions()
    perms.append(tuple([in_a[k] for k in jc.dot_dims(eqn).rhs_contract]
                       + [r_a]))
  scales = [jnp.asarray(lora.scale, dtype) for _, _, lora in group]
  parts, product = _project(x, [lora.a for _, _, lora in group], scales,
                            known, perms=tuple(perms),
                            dtype=jnp.dtype(dtype), r=r)
  return {j: part for (j, _, _), part in zip(group, parts)}, product


@functools.partial(jax.jit, inline=True,
                   static_argnames=("perms", "dtype", "r"))
def _project(x, factors, scales, known, *, perms, dtype, r):
  """:func:`project_group`'s products, jitted so that its trace and its
  linearization are made once per shape, not once per group."""
  lead = [] if r is None else [0]  # per-row factors: the row axis first
  firsts = []
  for a, perm in zip(factors, perms):
    firsts.append(as_matrix(a, perm, len(lead)).astype(dtype))
  a = jnp.concatenate(firsts, axis=-1)
  if r is None:
    x2 = jc.reshape(x.astype(dtype), (-1, a.shape[0]))
    t = project(x2, a) if known is None else reuse(x2, a, known)
  else:
    if known is not None:
      raise AssertionError("lora_jax: a per-row product given as known (a "
                           "bug in lora_jax)")
    xm = jnp.moveaxis(x.astype(dtype), r, 0)
    t = jc.dot(jc.reshape(xm, (xm.shape[0], -1, a.shape[1])), a,
               (((2,), (1,)), ((0,), (0,))))
  offsets = list(itertools.accumulate(f.shape[-1] for f in firsts))[:-1]
  parts = jnp.split(t, offsets, axis=-1)
  return [part * (scale if r is None
                  else jc.align(scale, t, {0: 0})[:, None, None])
          for part, scale in zip(parts, scales)], t
