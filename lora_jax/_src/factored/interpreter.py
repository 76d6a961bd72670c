"""The interpreter: evaluates a traced program with adapted kernels carried
as symbolic :class:`Lora` values, dispatching each equation that touches one
to its rule (one table, :data:`RULES`); everything else is bound as traced."""

from __future__ import annotations

from typing import Callable

import jax

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored import consumers, programs, recompute, rows, views
from lora_jax._src.factored.siblings import find_group, project_group
from lora_jax._src.factored.values import Context, Lora, NeedsRowVmap, Report
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.quant import QArray

# (primitives, rule(eqn, invals, ctx) -> outputs), first match wins.
RULES: list[tuple[jc.Primitives, Callable]] = [
    (jc.DOT, consumers.dot_general),
    (jc.CONV, consumers.conv_general_dilated),
    (jc.GATHER, consumers.gather),
    (jc.RAGGED_DOT, consumers.ragged_dot_general),
    (jc.TRANSPOSE, views.transpose),
    (jc.CAST, views.cast),
    (jc.ON_KERNEL, views.on_kernel),
    (jc.ON_EVERY_PART, views.on_every_part),
    (jc.PASS, views.pass_through),
    (jc.SLICE, views.slice_),
    (jc.DYNAMIC_SLICE, views.dynamic_slice),
    (jc.SQUEEZE, views.squeeze),
]

# Sub-program structure (from jaxpr_core.higher_order) -> rule.
PROGRAM_RULES = {
    jc.Call: programs.call,
    jc.Remat: programs.remat,
    jc.Scan: programs.scan,
    jc.Cond: programs.cond,
    jc.While: programs.while_,
    jc.ShardMap: programs.shard_map,
}

_cache: dict = {}


def rule_for(primitive) -> Callable:
  """The rule for an equation with a kernel among its operands."""
  try:
    return _cache[primitive]
  except KeyError:
    pass
  rule = next((r for prims, r in RULES if primitive in prims),
              consumers.fallback)
  _cache[primitive] = rule
  return rule


# Rules that know a kernel with per-row factors (a mixed batch run whole).
_ROW_RULES = (consumers.dot_general, views.cast, views.pass_through)


def _apply(eqn, invals, ctx: Context) -> list:
  """Runs the rule for ``eqn``; parameters this JAX names differently make
  it a counted merge fallback, never a bare KeyError."""
  try:
    sub = jc.higher_order(eqn)
    if any(isinstance(x, Lora) and x.rows for x in invals) and (
        isinstance(sub, (jc.While, jc.Cond, jc.ShardMap))
        or (sub is None and rule_for(eqn.primitive) not in _ROW_RULES)):
      raise NeedsRowVmap(f"{eqn.primitive.name} reads a per-row kernel")
    if sub is not None:
      return PROGRAM_RULES[type(sub)](eqn, sub, invals, ctx, evaluate)
    return rule_for(eqn.primitive)(eqn, invals, ctx)
  except (KeyError, jc.UnknownSchemaError):
    return consumers.fallback(eqn, invals, ctx)


def _adapted_matmul(jaxpr, i: int, invals, env: dict, ctx: Context,
                    producers: dict, uses) -> dict | None:
  """Outputs ``{id(eqn): outputs}`` for the adapted ``dot_general``
  ``jaxpr.eqns[i]`` and the later ones projecting the same input (computed
  together), when its input is recomputed (:mod:`recompute`); otherwise None
  (after projecting the siblings jointly) and the caller applies the rule."""
  eqn = jaxpr.eqns[i]
  try:
    group = find_group(jaxpr.eqns, i, env, ctx)
  except (KeyError, jc.UnknownSchemaError):
    group = None  # the rule falls back for this equation
  members = [e for e, _ in group] if group else [eqn]
  loras = [x for x in invals if isinstance(x, Lora)]
  region = None
  if (ctx.recompute and len(invals) == 2 and len(loras) == 1
      and not ctx.dropping(loras[0])):
    x_var = eqn.invars[1] if isinstance(invals[0], Lora) else eqn.invars[0]
    region = recompute.input_region(x_var, producers, uses(), env,
                                    len(members))
  if region is None:
    if group:
      project_group(group, env[group[0][0].invars[0]], ctx)
    return None

  def compute(c: Context, x, member_invals):
    if group:  # with the kernel values passed in, not the outer ones
      project_group([(e, next(v for v in vals if isinstance(v, Lora)))
                     for e, vals in zip(members, member_invals)], x, c)
    return [_apply(e, vals, c) for e, vals in zip(members, member_invals)]
  outs = recompute.apply_recomputing(region, x_var, members, env, compute,
                                     ctx)
  return {id(e): o for e, o in zip(members, outs)}


def evaluate(program: jc.Program, args, ctx: Context, *,
             symbolic_outputs: bool = False) -> list:
  """Evaluates ``program`` where some inputs may be :class:`Lora` values.

  Its outputs are plain arrays (a kernel returned as such is merged), except
  with ``symbolic_outputs`` (an inlined call: the caller goes on with them).
  """
  jaxpr = program.jaxpr
  env: dict = dict(zip(jaxpr.constvars, program.consts))
  env.update(zip(jaxpr.invars, args))
  producers: dict = {}  # var -> the equation computing it
  counts = None

  def uses():  # how often each variable is read, counted once if needed
    nonlocal counts
    if counts is None:
      counts = recompute.use_counts(jaxpr)
    return counts
  done: dict = {}  # id(eqn) -> outputs computed with an earlier sibling
  for i, eqn in enumerate(jaxpr.eqns):
    if id(eqn) in done:
      outs = done.pop(id(eqn))
    else:
      invals = [jc.read(env, v) for v in eqn.invars]
      computed = None
      if not any(isinstance(x, Lora) for x in invals):
        outs = jc.bind(eqn, invals)
      else:
        if eqn.primitive in jc.DOT and id(eqn) not in ctx.projected:
          computed = _adapted_matmul(jaxpr, i, invals, env, ctx, producers,
                                     uses)
        if computed is None:
          outs = _apply(eqn, invals, ctx)
        else:
          outs = computed.pop(id(eqn))
          done.update(computed)
    for v, x in zip(eqn.outvars, outs):
      if not jc.is_dropvar(v):
        env[v] = x
        producers[v] = eqn
  outs = [jc.read(env, v) for v in jaxpr.outvars]
  return outs if symbolic_outputs else [ctx.concrete(x, "output")
                                        for x in outs]


def factored_apply(fn, base, deltas: dict, args, kwargs, *, strict=False,
                   report: Report | None = None, choose: Callable | None = None,
                   rng=None, recompute: bool = False, row_factors=None):
  """Evaluates ``fn(merge(base, delta), *args, **kwargs)`` in factored form;
  ``deltas`` is ``{path: LoraDelta}``.

  ``row_factors`` (a mixed-adapter batch run whole): ``{path: (a, b, scale,
  layout)}`` with a leading row axis on each, the rows being axis 0 of every
  array argument; raises :class:`NeedsRowVmap` where that cannot be done."""
  # fn sees a float array where the base holds a QArray: trace with stand-ins.
  stand_in = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(
          x, QArray) else x, base, is_leaf=lambda x: isinstance(x, QArray))
  closed, inputs, out_tree = jc.trace(fn, stand_in, args, kwargs)
  ctx = Context(strict, report if report is not None else Report(), choose,
                rng, recompute)
  n_params = len(jax.tree.leaves(stand_in))
  if row_factors:
    in_rows = [None] * n_params + [0 if getattr(x, "ndim", 0) else None
                                   for x in inputs[n_params:]]
    out_rows = rows.analyse(closed.jaxpr, in_rows, ctx.dot_rows)
    if any(r != 0 for r in out_rows):  # each output must be one per row
      raise NeedsRowVmap("an output's rows cannot be followed to axis 0")
  for i, (path, leaf) in enumerate(leaves_with_paths(base)):
    d = deltas.get(path)
    if row_factors and path in row_factors:
      a, b, scale, layout = row_factors[path]
      inputs[i] = Lora(leaf, a, b, scale, layout, path, rows=True)
    elif d is not None:
      inputs[i] = Lora(leaf, d.a, d.b, d.scale, d.layout, path,
                       d.magnitude, d.dropout)
    elif isinstance(leaf, QArray):  # not adapted: dequantized for the program
      inputs[i] = leaf.dequantize()
  outs = evaluate(jc.Program(closed.jaxpr, tuple(closed.consts)), inputs, ctx)
  return jax.tree.unflatten(out_tree, outs)
