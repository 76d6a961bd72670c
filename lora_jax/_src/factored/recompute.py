"""Fewer saved activations: an adapted matmul whose input is elementwise maths
on values the backward pass keeps anyway recomputes that input in the
backward pass instead of keeping it.

Each adapter must keep its input ``x`` for ``dA = x^T g``. When ``x`` is, say,
``gelu(y)`` of the previous layer's output ``y``, reverse mode otherwise keeps
``x`` *and* GELU's own intermediates (``tanh(...)``) next to ``y``; with the
region ``y -> gelu -> (x @ W0, x @ A)`` recomputed in the backward pass, only
``y`` is kept and the recomputation is a few elementwise ops (the frozen
matmul's output is not needed by the backward pass, so it is not recomputed,
and the low-rank product ``x @ a``, r columns, is kept from the forward
pass: :func:`lowrank.reuse`).
LayerNorm's scale-and-shift before q/k/v (siblings sharing ``x``) is handled
the same way, all the siblings in one region. On W3 the LoRA step's temp
memory drops from 160 to 106 MiB (``benchmarks/results/w3_cpu.md``).

The region is a ``custom_vjp`` rather than ``jax.checkpoint``: XLA:CPU drops
the checkpoint's optimization barriers before common-subexpression
elimination and merges the recomputation back into the forward pass (measured:
no saving at all). The price is forward mode under ``jit`` and
``jax.linearize``; see ``lj.wrap(..., recompute=False)``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import jax
import numpy as np

from lora_jax._src import fixpoint
from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored.ordering import after
from lora_jax._src.factored.values import Lora
from lora_jax._src.factored.values import flatten

# A size limit, not a loop bound: a region of more equations than this is
# left as it is (recomputing a long chain costs more than keeping its input).
MAX_REGION = 64


def _is_elementwise(eqn) -> bool:
  if eqn.primitive in jc.ELEMENTWISE:
    return True
  if eqn.primitive in jc.BROADCAST:  # a bias or scalar brought to x's shape
    return True
  sub = jc.higher_order(eqn)  # jax.nn.silu and friends are jitted
  return (isinstance(sub, jc.Call) and sub.kind == "call"
          and all(_is_elementwise(e) for e in sub.body.jaxpr.eqns))


def use_counts(jaxpr) -> collections.Counter:
  """How many times each variable is read (the program's outputs count)."""
  uses = collections.Counter(
      v for e in jaxpr.eqns for v in e.invars if not jc.is_literal(v))
  uses.update(v for v in jaxpr.outvars if not jc.is_literal(v))
  return uses


def _size(v) -> int:
  return int(np.prod(v.aval.shape, dtype=np.int64))


def input_region(x_var, eqns, producers: dict, uses, is_kernel: Callable,
                 readers: int = 1):
  """``(positions of the equations in program order, root variables)``
  computing ``x_var`` by elementwise maths from roots no larger than it and
  holding no kernel (``is_kernel(var)``, from the analysis), every
  intermediate read only inside the region and ``x_var`` read ``readers``
  times (by the matmuls); None when there is no such region. Runs before
  evaluation (:mod:`plan`). ``producers``: variable -> the position in
  ``eqns`` of the equation computing it."""
  if (jc.is_literal(x_var) or uses[x_var] != readers
      or x_var not in producers):
    return None
  x_size = _size(x_var)

  def grow(stop: frozenset):
    """The region above ``x_var`` that stops at ``stop``: ``(equations by
    position, roots)``."""
    region: dict = {}
    roots: list = []
    todo = [x_var]
    while todo:
      v = todo.pop()
      if jc.is_literal(v) or v in roots:
        continue
      i = producers.get(v)
      if i is None or v in stop or not _is_elementwise(eqns[i]):
        roots.append(v)
        continue
      if i not in region:
        region[i] = eqns[i]
        todo.extend(eqns[i].invars)
    return region, roots

  def shrink(stop: frozenset) -> frozenset:
    """Intermediates read outside the region become roots too."""
    region, _ = grow(stop)
    inner = collections.Counter(
        v for e in region.values() for v in e.invars if not jc.is_literal(v))
    return stop | {v for e in region.values() for v in e.outvars
                   if v is not x_var and uses[v] != inner[v]}
  # every round adds a variable of the program, or ends
  stop: frozenset = fixpoint.iterate(shrink, frozenset(), len(producers),
                          "a recompute region")
  region, roots = grow(stop)
  if not region or len(region) > MAX_REGION:
    return None
  if any(is_kernel(r) or _size(r) > x_size for r in roots):
    return None
  return sorted(region), roots


def apply_recomputing(region, x_var, members, env: dict,
                      compute: Callable, ctx, static=None) -> list:
  """``compute(ctx, x, [invals of each member], known)`` (the adapted
  matmuls ``members``, all reading ``x_var``; it returns their outputs and
  their joint low-rank product ``x @ a``, or None, and reuses ``known``, that
  product, when given) with ``x`` recomputed from the region's roots in the
  backward pass: a ``custom_vjp`` that keeps only the roots, the operands
  and the low-rank product, and whose backward pass ties the recomputation
  to the incoming cotangent, so that the backend can neither run it in the
  forward pass nor merge it with the forward pass's copy (XLA:CPU does both with
  ``jax.checkpoint``'s recomputation; see :mod:`ordering`, which leaves
  every value as it is). Returns each member's outputs.

  ``static``: what else ``compute`` depends on, as a hashable key (None:
  unknown). With it, regions that compute alike (the same equations and
  kernel settings on values of the same types: every layer of a deep
  model) share one traced backward pass (:func:`_sharing_key`)."""
  eqns, roots = region
  ctx = ctx.region()  # narrow frozen products: the region widens them
  member_vars = [list(e.invars) for e in members]
  flat, rebuild = flatten([None if v is x_var else jc.read(env, v)
                           for vs in member_vars for v in vs], scales=True)

  def region_fn(c, root_vals, flat_vals, known=None):
    local = dict(zip(roots, root_vals))
    jc.bind_into(eqns, local)
    x, vals = local[x_var], iter(rebuild(flat_vals))
    lists = [[x if v is x_var else val for v, val in zip(vs, vals)]
             for vs in member_vars]
    return compute(c, x, lists, known)

  @jax.custom_vjp
  def run(root_vals, flat_vals):
    return region_fn(ctx, root_vals, flat_vals)[0]

  def forward(root_vals, flat_vals):
    # keeps the roots, the operands and the low-rank product x @ a (r
    # columns: the backward pass reuses it rather than multiply again).
    # region_fn itself, not run: a custom_vjp called inside its own forward
    # rule is what forward-over-reverse (jvp of grad) cannot trace
    outs, product = region_fn(ctx, root_vals, flat_vals)
    return outs, (root_vals, flat_vals, product)

  key = _sharing_key(region, members, [
      jc.read(env, v) for vs in member_vars for v in vs if v is not x_var],
                     ctx, static)

  def backward(saved, g):
    root_vals, flat_vals, product = saved
    if key is None:
      return _backward(region_fn, ctx.quiet())(root_vals, flat_vals, product,
                                               g)
    # traced (and linearized, and transposed) once per key
    shared = ctx.shared.get(key)
    if shared is None:
      shared = ctx.shared.setdefault(key, jax.jit(
          _backward(region_fn, ctx.quiet()), inline=True))
    return shared(root_vals, flat_vals, product, g)

  run.defvjp(forward, backward)
  root_vals = [env[r] for r in roots]
  try:
    # jvp under jit and linearize fail later, when lowered or evaluated,
    # where no library code runs: lj.wrap(..., recompute=False)
    return run(root_vals, flat)
  except TypeError as e:  # an eager jvp, jacfwd: JAX refuses it here
    if "forward-mode" not in str(e):
      raise
    return region_fn(ctx, root_vals, flat)[0]


def _backward(region_fn: Callable, quiet) -> Callable:
  """The region's backward pass: the recomputation waits for the cotangent
  (:func:`ordering.after`), then the vjp of the whole region, reusing the
  forward pass's low-rank product ``product`` (None: recomputed)."""
  def backward(root_vals, flat_vals, product, g):
    root_vals = after(root_vals, g)  # in the backward pass, unchanged
    _, vjp = jax.vjp(lambda r, f: region_fn(quiet, r, f, product)[0],
                     root_vals, flat_vals)
    return vjp(g)
  return backward


def _lora_key(x: Lora) -> tuple:
  """What a kernel value contributes to a region's computation besides its
  arrays (whose types the ``jit`` cache keys on): not its path, which only
  names it."""
  scale = None if not isinstance(x.scale, (int, float)) else x.scale
  return (jc.value_key(scale), jc.value_key(x.layout), jc.value_key(x.dtype),
          jc.value_key(x.dropout), x.rows, x.magnitude is None,
          type(x.w).__name__)


def _sharing_key(region, members, values, ctx, static):
  """A key equal for two recompute regions whose backward passes are the
  same function of their arrays, or None where that cannot be said: the
  region's and the members' equations (:func:`jaxpr_core.equations_key`),
  each kernel's settings, ``static`` (what the caller's ``compute`` reads),
  and the context's. A context drawing dropout keys is never shared (each
  region draws its own). ``values``: the members' operands other than the
  shared input, in order."""
  if static is None or ctx.keys is not None:
    return None
  eqns, roots = region
  made = {v for e in eqns for v in e.outvars}
  outside = [v for e in members for v in e.invars
             if v not in made and not jc.is_literal(v)]
  try:
    structure = jc.equations_key(list(eqns) + list(members),
                                 list(roots) + outside)
    kernels = tuple(_lora_key(x) if isinstance(x, Lora) else None
                    for x in values)
    settings = (ctx.strict, jc.value_key(ctx.choose), ctx.recompute)
  except (jc.NoKey, jc.UnknownSchemaError):
    return None
  return structure, kernels, settings, static
