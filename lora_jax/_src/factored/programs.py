"""Sub-programs that a kernel flows into, re-emitted through public API with
the interpreter inside: calls are inlined, ``scan`` becomes
``jax.lax.scan`` (stacked kernels sliced per step), ``remat`` becomes
``jax.checkpoint`` (same policy), ``cond`` ``jax.lax.switch``, ``while``
``jax.lax.while_loop`` and ``shard_map`` ``shard_map`` (the factors enter
split like their kernel). Each rule is an entry of
``interpreter.RULES``, called as ``rule(eqn, invals, ctx, site)``: it reads
the structure of its equation through ``jaxpr_core.higher_order`` (a schema
this JAX names differently raises ``UnknownSchemaError``: a counted
fallback) and evaluates the sub-programs through ``site.evaluate``, the
interpreter itself."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored.values import Context
from lora_jax._src.factored.values import Lora
from lora_jax._src.factored.values import Site
from lora_jax._src.factored.values import flatten
from lora_jax._src.layouts import Layout
from lora_jax._src.quant import QArray
from lora_jax._src.sharding import factor_specs


def call(eqn, invals, ctx: Context, site: Site):
  """jit / closed_call are inlined. A custom_jvp / custom_vjp function that a
  kernel flows into is inlined too: the kernel's gradient is taken through
  its primal computation, as the merge engine would need a rule for a
  symbolic kernel that the custom rule cannot know."""
  sub, evaluate = _structure(eqn, site, jc.Call)
  return evaluate(sub.body, invals, ctx, symbolic_outputs=True)


def _structure(eqn, site: Site, kind: type) -> tuple[Any, Callable]:
  """``(jaxpr_core.higher_order(eqn), site.evaluate)``; the table's key
  promises the structure is a ``kind``."""
  sub = jc.higher_order(eqn)
  if not isinstance(sub, kind) or site.evaluate is None:
    raise TypeError(f"{eqn.primitive.name}: a {kind.__name__} rule was "
                    f"given a {type(sub).__name__} and evaluate="
                    f"{site.evaluate}")
  return sub, site.evaluate


def remat(eqn, invals, ctx: Context, site: Site):
  sub, evaluate = _structure(eqn, site, jc.Remat)
  flat, rebuild = flatten(invals)

  def body(*flat_vals):
    return evaluate(sub.body, rebuild(list(flat_vals)), ctx)
  return list(jax.checkpoint(body, prevent_cse=sub.prevent_cse,
                             policy=sub.policy)(*flat))


def _drop_leading(lora: Lora) -> Lora | None:
  """The per-step slice of a kernel stacked along view axis 0 (None if axis
  0 is not a batch axis)."""
  lay = lora.layout
  if 0 not in lay.batch:
    return None
  i = lay.batch.index(0)
  axis = i + 1 if lora.rows else i  # per-row factors: after the row axis
  move = lambda v: None if v is None else jnp.moveaxis(v, axis, 0)
  rest = lay.batch[:i] + lay.batch[i + 1:]
  dec = lambda axes: tuple(k - 1 for k in axes)
  # w stays stacked in the scanned operand; a, b (and magnitude) are scanned
  # along their (moved) leading axis.
  return dataclasses.replace(
      lora, a=move(lora.a), b=move(lora.b), magnitude=move(lora.magnitude),
      layout=Layout(dec(rest), dec(lay.inputs), dec(lay.outputs)))


def scan(eqn, invals, ctx: Context, site: Site):
  sub, evaluate = _structure(eqn, site, jc.Scan)
  nc, ncarry = sub.num_consts, sub.num_carry
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  init = [ctx.concrete(x, "scan carry") for x in init]
  moved = []
  for x in xs:
    if isinstance(x, Lora) and isinstance(x.w, QArray):
      # lax.scan slices the codes; the view gives each step one layer's
      # metadata (a stack whose blocks run along axis 0 is built now).
      x = (dataclasses.replace(x, w=x.w.scan_view()) if x.w.axis != 0
           and x.w.ndim >= 3 else x.eager())
    if isinstance(x, Lora):
      stepped = _drop_leading(x)
      moved.append(stepped if stepped is not None
                   else ctx.concrete(x, "scan over a non-batch axis"))
    else:
      moved.append(x)
  xs_flat, rebuild = flatten(moved)
  # Dropout draws a fresh key per scan step.
  keys = (jax.random.split(ctx.next_key(), sub.length) if ctx.has_rng
          else None)

  def body(carry, step):
    x_slices, key = step
    outs = evaluate(sub.body, [*consts, *carry, *rebuild(list(x_slices))],
                    ctx.with_rng(key))
    return outs[:ncarry], outs[ncarry:]
  carry, ys = jax.lax.scan(body, list(init), (xs_flat, keys),
                           length=sub.length, reverse=sub.reverse,
                           unroll=sub.unroll)
  return [*carry, *ys]


def cond(eqn, invals, ctx: Context, site: Site):
  sub, evaluate = _structure(eqn, site, jc.Cond)
  index, ops = invals[0], invals[1:]
  flat, rebuild = flatten(ops)
  branches = [
      (lambda b: lambda *f: evaluate(b, rebuild(list(f)), ctx))(br)
      for br in sub.branches]
  return list(jax.lax.switch(index, branches, *flat))


def while_(eqn, invals, ctx: Context, site: Site):
  sub, evaluate = _structure(eqn, site, jc.While)
  cn, bn = sub.cond_nconsts, sub.body_nconsts
  cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
  init = [ctx.concrete(x, "while carry") for x in invals[cn + bn:]]
  cond_fn = lambda c: evaluate(sub.cond, [*cconsts, *c], ctx)[0]
  body_fn = lambda c: evaluate(sub.body, [*bconsts, *c], ctx)
  return list(jax.lax.while_loop(cond_fn, body_fn, init))


def shard_map(eqn, invals, ctx: Context, site: Site):
  """The factors enter split like their kernel (``lj.factor_specs``)."""
  sub, evaluate = _structure(eqn, site, jc.ShardMap)
  in_specs = []
  for x, spec in zip(invals, sub.in_specs):
    if isinstance(x, Lora):
      a_spec, b_spec, m_spec = factor_specs(spec, x.layout)
      in_specs += [spec, a_spec, b_spec, m_spec]
    else:
      in_specs.append(spec)
  flat, rebuild = flatten(invals)
  # A kernel without DoRA has no magnitude: its None slot does not enter.
  present = [i for i, v in enumerate(flat) if v is not None]

  def body(present_vals):
    full = [None] * len(flat)
    for i, v in zip(present, present_vals):
      full[i] = v
    return evaluate(sub.body, rebuild(full), ctx)
  return list(sub.emit(body)([in_specs[i] for i in present], sub.out_specs)(
      *[flat[i] for i in present]))
