"""The interpreter: evaluates a traced program with adapted kernels carried
as symbolic :class:`Lora` values, dispatching each equation that touches one
to its rule (one table, :data:`RULES`); everything else is bound as traced."""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import functools

import jax

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored import consumers
from lora_jax._src.factored import programs
from lora_jax._src.factored import recompute
from lora_jax._src.factored import rows
from lora_jax._src.factored import views
from lora_jax._src.factored.siblings import find_group
from lora_jax._src.factored.siblings import project_group
from lora_jax._src.factored.values import NO_SITE
from lora_jax._src.factored.values import Context
from lora_jax._src.factored.values import FallbackError
from lora_jax._src.factored.values import Lora
from lora_jax._src.factored.values import NeedsRowVmap
from lora_jax._src.factored.values import Report
from lora_jax._src.factored.values import Site
from lora_jax._src.factored.values import fallback
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.quant import QArray

# One table keyed by primitive (as jax.experimental.sparse keys
# sparse_rules_bcoo[lax.scan_p]): rule(eqn, invals, ctx, site) -> outputs,
# for an equation with a kernel among its operands. Higher-order primitives
# are in it too: their rules read the sub-programs' structure from
# jaxpr_core.higher_order and evaluate them through site.evaluate.
RULES = jc.PrimitiveTable([
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
    (jc.CALL, programs.call),
    (jc.CUSTOM_JVP, programs.call),
    (jc.CUSTOM_VJP, programs.call),
    (jc.REMAT, programs.remat),
    (jc.SCAN, programs.scan),
    (jc.COND, programs.cond),
    (jc.WHILE, programs.while_),
    (jc.SHARD_MAP, programs.shard_map),
])

# Rules that know a kernel with per-row factors (a mixed batch run whole);
# the others raise NeedsRowVmap on one.
_ROW_RULES = (consumers.dot_general, views.cast, views.pass_through,
              views.on_kernel, programs.call, programs.remat, programs.scan)


def _apply(eqn, invals, ctx: Context, site: Site = NO_SITE,
           plans: tuple | None = None) -> list:
  """Runs the rule for ``eqn`` (``plans``: its sub-programs' row plans).

  Exactly two things become a counted merge fallback: a primitive without a
  rule, and parameters this JAX names differently
  (:class:`jaxpr_core.UnknownSchemaError`). Any other exception inside a rule
  is a bug, and propagates with the equation and the kernels' paths added.
  """
  rule = RULES.get(eqn.primitive)
  if (rule not in _ROW_RULES
      and any(isinstance(x, Lora) and x.rows for x in invals)):
    raise NeedsRowVmap(f"{eqn.primitive.name} reads a per-row kernel")
  if rule is None:
    return fallback(eqn, invals, ctx)
  body_plan = plans[0] if plans else None
  site = dataclasses.replace(
      site, evaluate=functools.partial(evaluate, plan=body_plan))
  try:
    with _bugs_named(eqn, invals):
      return rule(eqn, invals, ctx, site)
  except jc.UnknownSchemaError:
    return fallback(eqn, invals, ctx)


@contextlib.contextmanager
def _bugs_named(eqn, invals):
  """An exception inside a rule (a bug: the engine's own signals and
  :class:`jaxpr_core.UnknownSchemaError` aside) propagates with the
  equation and the kernels' paths added."""
  try:
    yield
  except (NeedsRowVmap, FallbackError, jc.UnknownSchemaError):
    raise  # the engine's own signals, already saying what and where
  except Exception as e:
    paths = sorted({x.path for x in invals if isinstance(x, Lora)})
    e.add_note(f"lora_jax factored engine: raised in the rule for "
               f"{eqn.primitive.name!r} consuming {', '.join(paths)} "
               f"(equation: {str(eqn)[:300]}). This is a bug in lora_jax; "
               f"mode='merge' avoids the rule until it is fixed.")
    raise


def _site(plan: rows.RowPlan | None, i: int, projected: dict) -> Site:
  return Site(rows=plan.dots.get(i) if plan else None,
              projected=projected.pop(i, None))


def _adapted_matmul(jaxpr, i: int, invals, env: dict, ctx: Context,
                    producers: dict, uses, plan, projected: dict
                    ) -> dict | None:
  """Outputs ``{index: outputs}`` for the adapted ``dot_general``
  ``jaxpr.eqns[i]`` and the later ones projecting the same input (computed
  together), when its input is recomputed (:mod:`recompute`); otherwise None
  (after projecting the siblings jointly into ``projected``) and the caller
  applies the rule.

  Sibling groups and recompute regions are still formed here, during
  evaluation, because both read which variables hold a :class:`Lora` and
  with what layout, rows, DoRA and dropout, which only evaluation knows
  today. Forming them before it (as :mod:`rows` forms the row plan) needs a
  :class:`walk.Walker` analysis giving each variable its abstract kernel
  (the view rules' layout maths on abstract values, as :mod:`discover`
  follows kernels for layouts), from which each frame records its groups
  and regions by equation position next to the row plan's ``dots``."""
  eqn = jaxpr.eqns[i]
  try:
    found = find_group(jaxpr.eqns, i, env, ctx,
                       lambda j: plan.dots.get(j) if plan else None)
  except jc.UnknownSchemaError:
    found = None  # the rule falls back for this equation
  group, x_rows = found if found else (None, None)
  members = [(j, e) for j, e, _ in group] if group else [(i, eqn)]
  loras = [x for x in invals if isinstance(x, Lora)]
  region = None
  if (ctx.recompute and len(invals) == 2 and len(loras) == 1
      and not ctx.dropping(loras[0])):
    x_var = eqn.invars[1] if isinstance(invals[0], Lora) else eqn.invars[0]
    region = recompute.input_region(x_var, jaxpr.eqns, producers, uses(), env,
                                    len(members))
  if region is None:
    if group:
      with _bugs_named(eqn, invals):
        projected.update(project_group(group, env[group[0][1].invars[0]],
                                       x_rows))
    return None

  def compute(c: Context, x, member_invals):
    proj: dict = {}
    if group:  # with the kernel values passed in, not the outer ones
      with _bugs_named(eqn, invals):
        proj = project_group(
            [(j, e, next(v for v in vals if isinstance(v, Lora)))
             for (j, e), vals in zip(members, member_invals)], x, x_rows)
    return [_apply(e, vals, c, _site(plan, j, proj))
            for (j, e), vals in zip(members, member_invals)]
  outs = recompute.apply_recomputing(region, x_var, [e for _, e in members],
                                     env, compute, ctx)
  return {j: o for (j, _), o in zip(members, outs)}


def evaluate(program: jc.Program, args, ctx: Context, *,
             plan: rows.RowPlan | None = None,
             symbolic_outputs: bool = False) -> list:
  """Evaluates ``program`` where some inputs may be :class:`Lora` values.

  ``plan``: the row analysis of this program at this call site (a mixed
  batch run whole), else None. Its outputs are plain arrays (a kernel
  returned as such is merged), except with ``symbolic_outputs`` (an inlined
  call: the caller goes on with them).
  """
  jaxpr = program.jaxpr
  env: dict = dict(zip(jaxpr.constvars, program.consts))
  env.update(zip(jaxpr.invars, args))
  producers: dict = {}  # var -> the position of the equation computing it
  counts = None

  def uses():  # how often each variable is read, counted once if needed
    nonlocal counts
    if counts is None:
      counts = recompute.use_counts(jaxpr)
    return counts
  done: dict = {}       # index -> outputs computed with an earlier sibling
  projected: dict = {}  # index -> scale * x @ a, computed with its siblings
  for i, eqn in enumerate(jaxpr.eqns):
    if i in done:
      outs = done.pop(i)
    else:
      invals = [jc.read(env, v) for v in eqn.invars]
      computed = None
      if not any(isinstance(x, Lora) for x in invals):
        outs = jc.bind(eqn, invals)
      else:
        if eqn.primitive in jc.DOT and i not in projected:
          computed = _adapted_matmul(jaxpr, i, invals, env, ctx, producers,
                                     uses, plan, projected)
        if computed is None:
          outs = _apply(eqn, invals, ctx, _site(plan, i, projected),
                        plan.subs.get(i) if plan else None)
        else:
          outs = computed.pop(i)
          done.update(computed)
    for v, x in zip(eqn.outvars, outs):
      if not jc.is_dropvar(v):
        env[v] = x
        producers[v] = i
  outs = [jc.read(env, v) for v in jaxpr.outvars]
  return outs if symbolic_outputs else [ctx.concrete(x, "output")
                                        for x in outs]


def _stand_ins(base):
  """``base`` with each QArray as the float array ``fn`` sees (abstract;
  under Explicit mesh axes sharded as its codes, axis for axis)."""
  return jax.tree.map(
      lambda x: jc.abstract_like(x.codes, x.shape, x.dtype) if isinstance(
          x, QArray) else x, base, is_leaf=lambda x: isinstance(x, QArray))


def _row_analysis(closed, n_params: int, inputs):
  in_rows = [None] * n_params + [0 if getattr(x, "ndim", 0) else None
                                 for x in inputs[n_params:]]
  return rows.analyse(closed.jaxpr, in_rows)


def output_rows(fn, base, args, kwargs, kernels=frozenset()
                ) -> tuple[list, list, object, list]:
  """For a mixed-adapter batch (rows on axis 0 of every array argument):
  ``(row axis of each flat output, each flat output's shape, out tree,
  whether each flat output reads a base leaf whose path is in kernels)``;
  a row axis is an int, None (the output does not read the rows) or
  :data:`rows.UNKNOWN`."""
  stand_in = _stand_ins(base)
  closed, inputs, out_tree = jc.trace(fn, stand_in, args, kwargs)
  n_params = len(jax.tree.leaves(stand_in))
  out_rows, _ = _row_analysis(closed, n_params, inputs)
  in_reads = [p in kernels for p, _ in leaves_with_paths(stand_in)]
  reads = rows.reads(closed.jaxpr,
                     in_reads + [False] * (len(inputs) - n_params))
  return (out_rows, [tuple(a.shape) for a in closed.out_avals], out_tree,
          reads)


def factored_apply(fn, base, deltas: dict, args, kwargs, *, strict=False,
                   report: Report | None = None, choose: Callable | None = None,
                   rng=None, recompute: bool = False, row_factors=None):
  """Evaluates ``fn(merge(base, delta), *args, **kwargs)`` in factored form;
  ``deltas`` is ``{path: LoraDelta}``.

  ``row_factors`` (a mixed-adapter batch run whole): ``{path: (a, b, scale,
  layout, dropout)}`` with a leading row axis on each, the rows being axis 0 of every
  array argument; raises :class:`NeedsRowVmap` where that cannot be done."""
  # fn sees a float array where the base holds a QArray: trace with stand-ins.
  stand_in = _stand_ins(base)
  closed, inputs, out_tree = jc.trace(fn, stand_in, args, kwargs)
  ctx = Context.create(strict, report if report is not None else Report(), choose,
                rng, recompute)
  n_params = len(jax.tree.leaves(stand_in))
  plan = None
  if row_factors:
    out_rows, plan = _row_analysis(closed, n_params, inputs)
    if any(r is rows.UNKNOWN for r in out_rows):
      # an output mixes rows, or they cannot be followed: vmap over rows
      # decides (and refuses what has no per-row meaning)
      raise NeedsRowVmap("an output's rows cannot be followed")
  for i, (path, leaf) in enumerate(leaves_with_paths(base)):
    d = deltas.get(path)
    if row_factors and path in row_factors:
      a, b, scale, layout, dropout = row_factors[path]
      inputs[i] = Lora(leaf, a, b, scale, layout, path, dropout=dropout,
                       rows=True)
    elif d is not None:
      inputs[i] = Lora(leaf, d.a, d.b, d.scale, d.layout, path,
                       d.magnitude, d.dropout)
    elif isinstance(leaf, QArray):  # not adapted: dequantized for the program
      inputs[i] = leaf.dequantize()
  outs = evaluate(jc.Program(closed.jaxpr, tuple(closed.consts)), inputs, ctx,
                  plan=plan)
  return jax.tree.unflatten(out_tree, outs)
