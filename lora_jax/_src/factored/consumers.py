"""Rules for the ops that consume a kernel.

Every rule has the same skeleton (:func:`consumer`): a *plan* function reads
the equation and says how to compute the LoRA branch ``scale * op'(op''(x,
a), b)`` in low rank and where the kernel's output units land in the result;
the skeleton does the rest, once for all rules: the engine choice of
``mode="auto"``, dtype promotion, LoRA dropout on the branch's input, DoRA's
per-output factor, the base op on ``W0``, and the report. A new consumer is a
new plan function and one line in ``interpreter.RULES``.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.dtypes import is_float
from lora_jax._src.factored.frozen import frozen_linear
from lora_jax._src.factored.lowrank import a_matrix
from lora_jax._src.factored.lowrank import lowrank_dot
from lora_jax._src.factored.values import NO_SITE
from lora_jax._src.factored.values import Context
from lora_jax._src.factored.values import Lora
from lora_jax._src.factored.values import NeedsRowVmap
from lora_jax._src.factored.values import Site
from lora_jax._src.factored.values import fallback


@dataclasses.dataclass
class Plan:
  """How one consumer computes its LoRA branch.

  Attributes:
    lora: the kernel value consumed.
    x: the other operand (the activation), or None where the branch has no
      activation input (an embedding lookup: no dropout there, as PEFT).
    rule: the name the report gives this use.
    lowrank: ``x -> scale * op'(op''(x, a), b)`` laid out like the op's
      result, for ``x`` already in the compute dtype (and dropped out).
    place_outputs: ``(*batch, *out) values -> array broadcasting against the
      op's result`` (for DoRA); None where the kernel's output units are not
      axes of the result (a transposed use).
    cost: ``(x_shape, x_contract)`` for ``mode="auto"``'s cost model, or
      None if the use is always factored.
    linear_op: ``(x, w) -> op(x, w)``, the op itself as a function linear in
      ``x``, for a narrow kernel built at the point of use; None where the
      op is not linear in ``x`` (a lookup).
  """
  lora: Lora
  x: Any
  rule: str
  lowrank: Callable[[Any], Any]
  place_outputs: Callable[[Any], Any] | None = None
  cost: tuple | None = None
  linear_op: Callable[[Any, Any], Any] | None = None


def consumer(plan_fn: Callable) -> Callable:
  """A rule from a plan function ``(eqn, invals, ctx) -> Plan | None``."""
  def rule(eqn, invals, ctx: Context, site: Site = NO_SITE) -> list:
    plan = plan_fn(eqn, invals, ctx, site)
    if plan is None:
      return fallback(eqn, invals, ctx)
    lora = plan.lora
    if (plan.cost is not None and not ctx.dropping(lora) and not lora.rows
        and ctx.choose is not None
        and ctx.choose(*plan.cost, lora) == "merge"):
      ctx.report.record(lora.path, "merge (auto: cheaper)")
      return jc.bind(eqn, [lora.materialize() if v is lora else v
                           for v in invals])
    # the branch runs where the op does (an auto_axes region's mesh, say)
    with jc.context(eqn):
      return _branch(eqn, invals, plan, ctx)
  return rule


def _branch(eqn, invals, plan: Plan, ctx: Context) -> list:
  """The op's result with the LoRA branch (and DoRA's factor) applied."""
  lora, place = plan.lora, plan.place_outputs
  if lora.magnitude is not None and place is None:
    return fallback(eqn, invals, ctx)
  x = plan.x
  dtype = jnp.result_type(lora.a.dtype, *([] if x is None else [x.dtype]))
  low = plan.lowrank(None if x is None
                     else ctx.dropout(x, lora).astype(dtype))
  if low is None:
    return fallback(eqn, invals, ctx)
  # under Explicit mesh axes: the base product's own sharding type
  low = jc.reshard_like(low, eqn.outvars[0].aval)
  base = _frozen(eqn, invals, plan, ctx.recompute and not ctx.in_region)
  out_dtype = eqn.outvars[0].aval.dtype
  if lora.magnitude is None or place is None:
    ctx.report.record(lora.path, plan.rule)
    return [base + low.astype(out_dtype)]
  # DoRA: (m / ||W0 + s a b||) * (op(x, W0) + s op'(op''(x, a), b)).
  factor = place(lora.dora_factor(dtype))
  ctx.report.record(lora.path, plan.rule + " + DoRA")
  return [(factor * (base.astype(dtype) + low)).astype(out_dtype)]


def _frozen(eqn, invals, plan: Plan, reverse_only: bool):
  """The op on the frozen kernel: a narrow one (quantized, bf16 widened by
  the program) is built where it is used and rebuilt in the backward pass
  (``reverse_only``: the ``custom_vjp`` form, :func:`frozen.frozen_linear`)."""
  lora, x = plan.lora, plan.x
  dtype = lora.dtype if lora.dtype is not None else jnp.dtype(lora.w.dtype)
  # a mixed-precision op (bf16 kernel, float32 activation) widens it inside
  widened_by_op = x is not None and is_float(x) and (
      jnp.dtype(x.dtype).itemsize > dtype.itemsize)
  if (lora.narrow or widened_by_op) and plan.linear_op is not None:
    return frozen_linear(plan.linear_op, x, lora.w,
                         x.dtype if widened_by_op else dtype, reverse_only)
  return jc.bind(eqn, [lora.kernel() if v is lora else v for v in invals])[0]


# ---- dot_general ----------------------------------------------------------------

# (b, m, k) x (b, k, n) -> (b, m, n)
_BATCHED = (((2,), (1,)), ((0,), (0,)))


def _dot_plan(eqn, invals, ctx: Context, site: Site) -> Plan | None:
  lhs, rhs = invals
  if isinstance(lhs, Lora) == isinstance(rhs, Lora):
    return None
  kernel_is_lhs = isinstance(lhs, Lora)
  lora, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
  x_contract, k_contract, x_batch, k_batch = jc.dot_dims(eqn).side(
      kernel_is_lhs)
  if lora.rows:
    return _rowwise_plan(eqn, lora, x, kernel_is_lhs, x_contract, k_contract,
                         k_batch, site)
  projected = site.projected
  lowrank = lambda x_in: lowrank_dot(
      x_in, lora, x_contract, k_contract, x_batch, k_batch, kernel_is_lhs,
      projected=projected)[0]
  lay = lora.layout
  transposed = set(lay.outputs) == set(k_contract)
  # dot_general's result: batch dims, then lhs free dims, then rhs free
  # dims, each ascending; where does each kernel batch / output axis land?
  n_x_free = x.ndim - len(x_contract) - len(x_batch)
  k_free = sorted(set(range(lora.w.ndim)) - set(k_contract) - set(k_batch))
  first_free = len(k_batch) + (0 if kernel_is_lhs else n_x_free)
  positions = {k: j for j, k in enumerate(k_batch)}
  positions.update({k: first_free + j for j, k in enumerate(k_free)})
  out_ndim = len(eqn.outvars[0].aval.shape)
  place = None if transposed else (
      lambda v: lay.place_outputs(v, positions, out_ndim))
  rule = "dot_general (transposed use)" if transposed else "dot_general"
  op = lambda x, w: jc.bind(eqn, [w, x] if kernel_is_lhs else [x, w])[0]
  return Plan(lora, x, rule, lowrank, place, cost=(x.shape, x_contract),
              linear_op=op)


def _rowwise_plan(eqn, lora: Lora, x, kernel_is_lhs, x_contract, k_contract,
                  k_batch, site: Site) -> Plan:
  """A mixed-adapter batch run whole: ``lora``'s factors carry a leading row
  axis; the branch is one batched product over rows (``x``'s row axis from
  :mod:`rows`). Only ``x @ kernel`` with ``x``'s contracted axes last and the
  kernel's input axes contracted has this rule; anything else runs the call
  under ``vmap`` instead."""
  lay = lora.layout
  lhs_rows, rhs_rows = site.rows or (None, None)
  r = lhs_rows if not kernel_is_lhs else rhs_rows
  nd = x.ndim
  # the contracted pairs in x's axis order (einsum may list them otherwise)
  pairs = sorted(zip(x_contract, k_contract))
  x_contract = tuple(p[0] for p in pairs)
  k_contract = tuple(p[1] for p in pairs)
  if (kernel_is_lhs or k_batch or lay.batch or not isinstance(r, int)
      or set(lay.inputs) != set(k_contract)
      or tuple(x_contract) != tuple(range(nd - len(x_contract), nd))
      or r >= nd - len(x_contract) or lora.magnitude is not None):
    raise NeedsRowVmap(f"{lora.path}: {eqn.primitive.name}")
  in_a, in_b, r_a, r_b = lay.factor_positions()
  free = sorted(set(range(lora.w.ndim)) - set(k_contract))

  def lowrank(x_in):
    dtype = x_in.dtype
    rows = x_in.shape[r]
    f1 = a_matrix(lora.a, in_a, k_contract, r_a, lead=1).astype(dtype)
    f2 = jnp.transpose(lora.b, [0, 1 + r_b] + [1 + in_b[k] for k in free])
    n_shape = f2.shape[2:]
    f2 = jc.reshape(f2, (rows, f2.shape[1], -1)).astype(dtype)
    xm = jnp.moveaxis(x_in, r, 0)
    m_shape = xm.shape[1:nd - len(x_contract)]
    if site.projected is not None:  # computed with its siblings
      t = site.projected.astype(dtype)
    else:
      t = jc.dot(jc.reshape(xm, (rows, -1, f1.shape[1])), f1, _BATCHED)
      scale = jc.align(jnp.asarray(lora.scale, dtype), t, {0: 0})
      t = t * scale[:, None, None]
    u = jc.dot(t, f2, _BATCHED)
    return jnp.moveaxis(jc.reshape(u, (rows, *m_shape, *n_shape)), 0, r)

  op = lambda x, w: jc.bind(eqn, [x, w])[0]
  return Plan(lora, x, "dot_general (rows: one product per row)", lowrank,
              None, linear_op=op)


# ---- conv_general_dilated -------------------------------------------------------

def _conv_plan(eqn, invals, ctx: Context, site: Site) -> Plan | None:
  del ctx, site
  lhs, rhs = invals
  dims = jc.conv_dims(eqn)
  if isinstance(lhs, Lora) or dims.groups != 1:
    return None
  lora = rhs
  lay = lora.layout
  out_axis = dims.rhs_spec[0]
  if (lay.batch or lay.outputs != (out_axis,)
      or set(lay.inputs) != set(dims.rhs_spec[1:])):
    return None
  feat = dims.out_feature_axis
  p = jc.conv_params(eqn)

  def lowrank(x):
    # a as a conv kernel with r output features, in the view's axis order
    r = lora.a.shape[-1]
    order = list(lay.inputs) + [out_axis]
    perm = sorted(range(len(order)), key=lambda i: order[i])
    a_kernel = jnp.transpose(lora.a, perm).astype(x.dtype)
    hidden = jax.lax.conv_general_dilated(
        x, a_kernel, p.window_strides, p.padding, p.lhs_dilation,
        p.rhs_dilation, p.dimension_numbers, precision=p.precision)
    hidden = jnp.moveaxis(hidden, feat, -1) * jnp.asarray(lora.scale, x.dtype)
    shape = hidden.shape
    low = (hidden.reshape(-1, r) @ lora.b.astype(x.dtype)).reshape(
        *shape[:-1], lora.b.shape[-1])
    return jnp.moveaxis(low, -1, feat)

  place = lambda v: lay.place_outputs(v, {out_axis: feat},
                                      len(eqn.outvars[0].aval.shape))
  return Plan(lora, lhs, "conv_general_dilated", lowrank, place,
              linear_op=lambda x, w: jc.bind(eqn, [x, w])[0])


# ---- gather (embedding lookup) ----------------------------------------------------

def _gather_plan(eqn, invals, ctx: Context, site: Site) -> Plan | None:
  del ctx, site
  operand, indices = invals
  if isinstance(indices, Lora):
    return None
  lora = operand
  lay = lora.layout
  g = jc.gather_dims(eqn)
  ok = (lora.w.ndim == 2 and not lay.batch
        and g.collapsed_slice_dims == lay.inputs
        and g.start_index_map == lay.inputs and len(g.offset_dims) == 1
        and g.slice_sizes[lay.outputs[0]] == lora.w.shape[lay.outputs[0]]
        and not g.operand_batching_dims)
  if not ok:
    return None
  off = g.offset_dims[0]

  def lowrank(_):
    # Gather rows of a (vocab, r) with the same indices, then project with b:
    # a laid out as the operand, r where the operand's output axis is (a
    # transposed table, (dim, vocab), gathers from a.T)
    a = lora.a if lay.inputs[0] < lay.outputs[0] else lora.a.T
    sizes = list(g.slice_sizes)
    sizes[lay.outputs[0]] = lora.a.shape[-1]
    rows = jc.gather_with_slice_sizes(eqn, a, indices, sizes)
    rows = jnp.moveaxis(rows, off, -1) * jnp.asarray(lora.scale, rows.dtype)
    return jnp.moveaxis(rows @ lora.b, -1, off)

  place = lambda v: lay.place_outputs(v, {lay.outputs[0]: off},
                                      len(eqn.outvars[0].aval.shape))
  return Plan(lora, None, "gather", lowrank, place)


# ---- ragged_dot_general (grouped matmul: MoE experts) -------------------------

def _ragged_plan(eqn, invals, ctx: Context, site: Site) -> Plan | None:
  del ctx, site
  lhs, rhs, group_sizes = invals[0], invals[1], invals[2]
  if isinstance(lhs, Lora) or not isinstance(rhs, Lora) or isinstance(
      group_sizes, Lora) or len(invals) != 3:
    return None
  lora = rhs
  lay = lora.layout
  d = jc.ragged_dims(eqn)
  ndim = lora.w.ndim
  # The form jax.lax.ragged_dot emits: x (m, k) ragged along m, w (g, k, n).
  if (ndim != 3 or d.rhs_group != (0,) or d.rhs_contract != (1,)
      or d.lhs_contract != (lhs.ndim - 1,) or d.lhs_batch or d.rhs_batch
      or lay != type(lay)((0,), (1,), (2,))):
    return None
  # a (g, k, r) and b (g, r, n) are ragged-dot kernels of the same form.
  def lowrank(x):
    t = jc.bind(eqn, [x, lora.a.astype(x.dtype), group_sizes])[0]
    t = t.astype(x.dtype) * jnp.asarray(lora.scale, x.dtype)
    return jc.bind(eqn, [t, lora.b.astype(x.dtype), group_sizes])[0]
  return Plan(lora, lhs, "ragged_dot_general", lowrank,
              linear_op=lambda x, w: jc.bind(eqn, [x, w, group_sizes])[0])


dot_general = consumer(_dot_plan)
conv_general_dilated = consumer(_conv_plan)
gather = consumer(_gather_plan)
ragged_dot_general = consumer(_ragged_plan)
