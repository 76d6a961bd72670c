"""Kernels that read the same input (q, k, v; gate and up) get their
``x @ a`` in one matmul against the concatenated ``a``s: one pass over ``x``
forward and one for the gradients, instead of one per kernel."""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored.lowrank import project
from lora_jax._src.factored.values import Context, Lora


def _plain_projection(eqn, env, ctx: Context):
  """``(x var, contraction, lora)`` if ``eqn`` is ``x @ kernel`` taking the
  2-D fast path of ``lowrank_dot`` with a plain (no DoRA, no dropout)
  adapter that the engine would factor; else None."""
  if eqn.primitive not in jc.DOT:
    return None
  dims = jc.dot_dims(eqn)
  lhs, rhs = eqn.invars
  if (dims.lhs_batch or dims.rhs_batch or jc.is_literal(lhs)
      or jc.is_literal(rhs)):
    return None
  lora, x = env.get(rhs), env.get(lhs)
  if (not isinstance(lora, Lora) or x is None or isinstance(x, Lora)
      or lora.rows):
    return None
  nd = len(lhs.aval.shape)
  lc = dims.lhs_contract
  lay = lora.layout
  if (lora.magnitude is not None or ctx.dropping(lora) or lay.batch
      or set(lay.inputs) != set(dims.rhs_contract)
      or lc != tuple(range(nd - len(lc), nd))):
    return None
  if ctx.choose is not None and ctx.choose(x.shape, lc, lora) == "merge":
    return None
  return lhs, lc, lora


def find_group(eqns, i: int, env: dict, ctx: Context):
  """``[(index, eqn, lora), ...]``: ``eqns[i]`` and every later equation of
  the same program that projects the same ``x`` (at least two), or None."""
  head = _plain_projection(eqns[i], env, ctx)
  if head is None:
    return None
  group = [(i, eqns[i], head[2])]
  for j in range(i + 1, len(eqns)):
    other = _plain_projection(eqns[j], env, ctx)
    if other is not None and other[:2] == head[:2]:
      group.append((j, eqns[j], other[2]))
  return group if len(group) > 1 else None


def project_group(group, x) -> dict:
  """``{index: scale * x @ a}`` for the group's equations, computed in one
  matmul against the concatenated ``a``s."""
  dtype = jnp.result_type(x.dtype, *(lora.a.dtype for _, _, lora in group))
  firsts = []
  for _, eqn, lora in group:
    in_a, _, r_a, _ = lora.layout.factor_positions()
    f1 = jnp.transpose(lora.a, [in_a[k] for k in jc.dot_dims(eqn).rhs_contract]
                       + [r_a])
    firsts.append(f1.reshape(-1, f1.shape[-1]).astype(dtype))
  x2 = x.astype(dtype).reshape(-1, firsts[0].shape[0])
  t = project(x2, jnp.concatenate(firsts, axis=1))
  offsets = list(itertools.accumulate(f.shape[1] for f in firsts))[:-1]
  return {j: part * jnp.asarray(lora.scale, dtype)
          for (j, _, lora), part in zip(group, jnp.split(t, offsets, axis=1))}
