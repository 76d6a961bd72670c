"""Rules for ops that re-view a kernel: the result stays a symbolic
:class:`Lora` with its layout (and factors, where the view cuts them)
adjusted, so the consumer further down still gets the factored form."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.dtypes import is_float_dtype
from lora_jax._src.factored.values import Lora
from lora_jax._src.factored.values import fallback
from lora_jax._src.layouts import Layout
from lora_jax._src.quant import QArray
from lora_jax._src.sharding import follow_kernel
from lora_jax._src.sharding import follow_kernel_mesh


def pass_through(eqn, invals, ctx, site=None):
  """copy, optimization_barrier: the kernel value itself."""
  del ctx
  return list(invals[:len(eqn.outvars)])


def cast(eqn, invals, ctx, site=None):
  """A widening cast of a narrow (quantized or bf16) kernel stays pending
  until the point of use; any other cast applies to ``W0`` alone."""
  (x,) = invals
  to = jnp.dtype(eqn.outvars[0].aval.dtype)
  stored_narrow = isinstance(x.w, QArray) or (
      jnp.dtype(x.w.dtype).itemsize < to.itemsize)
  if stored_narrow and is_float_dtype(to):
    return [dataclasses.replace(x, dtype=to)]
  return on_kernel(eqn, [x.eager()], ctx)


def on_kernel(eqn, invals, ctx, site=None):
  """sharding constraints, device_put, reshard: applied to ``W0``; the
  factors keep their dtype and follow the kernel's new placement (its type
  under Explicit axes, a sharding constraint's ``NamedSharding``): an FSDP
  gather of the kernel gathers its factors."""
  del ctx
  invals = [x.eager() if isinstance(x, Lora) else x for x in invals]
  outs = jc.bind(eqn, [x.w if isinstance(x, Lora) else x for x in invals])
  constraint = jc.constraint_sharding(eqn)
  with jc.context(eqn):  # (a reshard into an auto_axes region: its mesh)
    return [_follow(dataclasses.replace(x, w=o), constraint)
            if isinstance(x, Lora) else o for x, o in zip(invals, outs)]


def _follow(x: Lora, constraint) -> Lora:
  if x.rows:  # per-row factors: placed with the rows they serve
    return x
  a, b, m = follow_kernel(x.a, x.b, x.magnitude, x.layout, x.w, constraint)
  return dataclasses.replace(x, a=a, b=b, magnitude=m,
                             scale=follow_kernel_mesh(x.scale, x.w))


def on_every_part(eqn, invals, ctx, site=None):
  """``pvary``, ``stop_gradient``: applied to ``W0`` and to each factor."""
  del ctx
  x = invals[0].eager()
  apply = lambda v: None if v is None else jc.bind(eqn, [v])[0]
  return [x.with_parts([apply(v) for v in x.parts()])]


def transpose(eqn, invals, ctx, site=None):
  del ctx
  x = invals[0].eager()
  perm = jc.transpose_perm(eqn)
  pos = {old: new for new, old in enumerate(perm)}
  lay = x.layout
  layout = Layout(tuple(pos[k] for k in lay.batch),
                  tuple(pos[k] for k in lay.inputs),
                  tuple(pos[k] for k in lay.outputs))
  return [dataclasses.replace(x, w=jax.numpy.transpose(x.w, perm),
                              layout=layout)]


def _cut(x: Lora, cuts: dict, cut_fn) -> Lora | None:
  """``x`` with ``cut_fn(array, axis, k)`` applied along each kernel-view
  axis ``k`` in ``cuts`` to ``w`` and to the factor (and magnitude) axis
  that holds it; None where DoRA forbids it (an input axis)."""
  lay = x.layout
  in_a, in_b, _, _ = lay.factor_positions()
  w, a, b, m = x.parts()
  for k in cuts:
    w = cut_fn(w, k, k)
    if k in in_a:
      a = cut_fn(a, in_a[k], k)
    if k in in_b:
      b = cut_fn(b, in_b[k], k)
    if m is not None:
      axis = lay.magnitude_axis(k)
      if axis is None:
        return None
      m = cut_fn(m, axis, k)
  return x.with_parts([w, a, b, m])


def slice_(eqn, invals, ctx, site=None):
  """A static slice of any kernel axes: the same slice of the factor that
  holds each axis (a stacked layer, an expert, q out of a fused qkv)."""
  x = invals[0].eager()
  start, limit, strides = jc.slice_params(eqn)
  cuts = {k: (s, l, st) for k, (s, l, st, d) in enumerate(
      zip(start, limit, strides, x.w.shape)) if (s, l, st) != (0, d, 1)}
  out = _cut(x, cuts, lambda v, axis, k: jax.lax.slice_in_dim(
      v, cuts[k][0], cuts[k][1], cuts[k][2], axis))
  return fallback(eqn, invals, ctx) if out is None else [out]


def dynamic_slice(eqn, invals, ctx, site=None):
  """A dynamic slice (``w[i]`` with a traced ``i``) of any kernel axes."""
  x, *starts = invals
  x = x.eager()
  if any(isinstance(s, Lora) for s in starts):
    return fallback(eqn, invals, ctx)
  sizes = jc.dynamic_slice_sizes(eqn)
  cuts = {k: (s, n) for k, (s, n, d) in enumerate(
      zip(starts, sizes, x.w.shape)) if n != d}
  out = _cut(x, cuts, lambda v, axis, k: jax.lax.dynamic_slice_in_dim(
      v, cuts[k][0], cuts[k][1], axis))
  return fallback(eqn, invals, ctx) if out is None else [out]


def squeeze(eqn, invals, ctx, site=None):
  """Dropping size-1 stacked axes (after slicing one layer or expert)."""
  x = invals[0].eager()
  dims = jc.squeeze_dims(eqn)
  lay = x.layout
  if not set(dims) <= set(lay.batch):
    return fallback(eqn, invals, ctx)
  in_a, in_b, _, _ = lay.factor_positions()
  w, a, b, m = x.parts()
  w = jax.lax.squeeze(w, dims)
  a = jax.lax.squeeze(a, [in_a[k] for k in dims])
  b = jax.lax.squeeze(b, [in_b[k] for k in dims])
  if m is not None:
    m = jax.lax.squeeze(m, [lay.magnitude_axis(k) for k in dims])

  def renumber(axes):
    return tuple(k - sum(d < k for d in dims) for k in axes if k not in dims)
  layout = Layout(renumber(lay.batch), renumber(lay.inputs),
                  renumber(lay.outputs))
  return [dataclasses.replace(x.with_parts([w, a, b, m]), layout=layout)]
