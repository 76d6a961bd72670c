"""The interpreter: evaluates a traced program with adapted kernels carried
as symbolic :class:`Lora` values, dispatching each equation that touches one
to its rule (one table, :data:`RULES`); everything else is bound as traced.
What to compute together (siblings, recompute regions) and along which row
axes comes from the :class:`plan.Plan` made before evaluation."""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import functools

import jax

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored import consumers
from lora_jax._src.factored import plan as plans
from lora_jax._src.factored import programs
from lora_jax._src.factored import recompute
from lora_jax._src.factored import rows
from lora_jax._src.factored import segments
from lora_jax._src.factored import views
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
           plan: plans.Plan | None = None, i: int = -1) -> list:
  """Runs the rule for ``eqn``, equation ``i`` of the program ``plan`` is
  for (its sub-programs are evaluated with their plans).

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
  if plan is not None and i in plan.subs:
    site = dataclasses.replace(site, evaluate=functools.partial(
        _evaluate_sub, plan, i))
  try:
    with _bugs_named(eqn, invals):
      return rule(eqn, invals, ctx, site)
  except jc.UnknownSchemaError:
    return fallback(eqn, invals, ctx)


def _evaluate_sub(plan: plans.Plan, i: int, program: jc.Program, args,
                  ctx: Context, symbolic_outputs: bool = False) -> list:
  """``site.evaluate`` for equation ``i``'s sub-programs: each with the
  plan made for it at this call site."""
  return evaluate(program, args, ctx, plan=plan.sub(i, program),
                  symbolic_outputs=symbolic_outputs)


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


def _site(plan: plans.Plan, i: int, projected: dict) -> Site:
  return Site(rows=plan.dots.get(i), projected=projected.pop(i, None))


def _kernel_at(eqn, env: dict) -> Lora | None:
  return next((x for x in (jc.read(env, v) for v in eqn.invars)
               if isinstance(x, Lora)), None)


def _head(plan: plans.Plan, i: int, invals, env: dict, ctx: Context,
          projected: dict) -> dict | None:
  """Head ``i`` of the plan (:class:`plan.Head`): its members' outputs
  ``{index: outputs}``, computed together when their input is recomputed
  (:mod:`recompute`); otherwise None, after projecting the siblings jointly
  into ``projected`` (the caller then applies each member's rule)."""
  head = plan.heads[i]
  eqns = plan.jaxpr.eqns
  eqn = eqns[i]
  plans.check(plan, i, eqn, lambda j: _kernel_at(eqns[j], env))
  members = [(j, eqns[j]) for j in head.members]
  if head.region is None:
    with _bugs_named(eqn, invals):
      projected.update(project_group(
          [(j, e, _kernel_at(e, env)) for j, e in members],
          jc.read(env, eqn.invars[0]), head.x_rows)[0])
    return None
  positions, roots = head.region
  x_var = eqn.invars[1] if isinstance(invals[0], Lora) else eqn.invars[0]

  def compute(c: Context, x, member_invals, known=None):
    """The members' outputs and their joint ``x @ a`` (None where the
    members do not project jointly or have per-row factors); ``known``:
    that product from the forward pass, reused in the backward pass."""
    proj: dict = {}
    product = None
    if head.project:  # with the kernel values passed in, not the outer ones
      with _bugs_named(eqn, invals):
        proj, product = project_group(
            [(j, e, next(v for v in vals if isinstance(v, Lora)))
             for (j, e), vals in zip(members, member_invals)], x,
            head.x_rows, known)
    outs = [_apply(e, vals, c, _site(plan, j, proj))
            for (j, e), vals in zip(members, member_invals)]
    return outs, (product if head.x_rows is None else None)
  # what compute reads besides the equations and kernels: the plan's
  static = (head.project, head.x_rows,
            tuple(plan.dots.get(j) for j, _ in members))
  outs = recompute.apply_recomputing(
      ([eqns[k] for k in positions], list(roots)), x_var,
      [e for _, e in members], env, compute, ctx, static)
  return {j: o for (j, _), o in zip(members, outs)}


def evaluate(program: jc.Program, args, ctx: Context, *,
             plan: plans.Plan | None = None,
             symbolic_outputs: bool = False) -> list:
  """Evaluates ``program`` where some inputs may be :class:`Lora` values.

  ``plan``: this program's plan at this call site (:mod:`plan`); None
  plans it here (a program evaluated on its own, no mixed batch). Its
  outputs are plain arrays (a kernel returned as such is merged), except
  with ``symbolic_outputs`` (an inlined call: the caller goes on with them).
  """
  jaxpr = program.jaxpr
  if plan is None:
    plan = plans.plan(jaxpr, [plans.Kernel.of(x) if isinstance(x, Lora)
                              else None for x in args], ctx)
  if plan.jaxpr is not jaxpr:
    raise AssertionError("lora_jax: a program evaluated with another "
                         "program's plan (a bug in lora_jax)")
  env: dict = dict(zip(jaxpr.constvars, program.consts))
  env.update(zip(jaxpr.invars, args))
  done: dict = {}       # index -> outputs computed with an earlier sibling
  projected: dict = {}  # index -> scale * x @ a, computed with its siblings
  def assign(eqn, outs):
    for v, x in zip(eqn.outvars, outs):
      if not jc.is_dropvar(v):
        env[v] = x

  def run(i, eqn, invals):
    if not any(isinstance(x, Lora) for x in invals):
      return jc.bind(eqn, invals)
    return _apply(eqn, invals, ctx, _site(plan, i, projected), plan, i)

  eqns = jaxpr.eqns
  last = segments.last_uses(jaxpr)
  for i, head in plan.heads.items():  # a region's roots are read at its head
    for r in () if head.region is None else head.region[1]:
      last[r] = max(last.get(r, -1), i)

  def plain(k: int) -> bool:
    e = eqns[k]
    return (k not in done and not segments.breaks_run(e) and not any(
        isinstance(env.get(v), Lora) for v in e.invars
        if not jc.is_literal(v)))

  i = 0
  while i < len(eqns):
    eqn = eqns[i]
    if i in done:
      assign(eqn, done.pop(i))
      i += 1
      continue
    end = i
    while end < len(eqns) and plain(end):
      end += 1  # values made in the run are plain: env has no entry yet
    if end - i >= segments.MIN_RUN:
      segments.evaluate_run(eqns[i:end], env, last, end)
      i = end
      continue
    invals = [jc.read(env, v) for v in eqn.invars]
    computed = None
    if i in plan.heads and any(isinstance(x, Lora) for x in invals):
      for k in plan.heads[i].early:  # members' kernel views, first
        if k not in done:
          e = jaxpr.eqns[k]
          done[k] = run(k, e, [jc.read(env, v) for v in e.invars])
          assign(e, done[k])
      computed = _head(plan, i, invals, env, ctx, projected)
    if computed is None:
      outs = run(i, eqn, invals)
    else:
      outs = computed.pop(i)
      done.update(computed)
    assign(eqn, outs)
    i += 1
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
                ) -> tuple[list, list, object, list, bool]:
  """For a mixed-adapter batch (rows on axis 0 of every array argument):
  ``(row axis of each flat output, each flat output's shape, out tree,
  whether each flat output reads a base leaf whose path is in kernels,
  whether the program holds a shard_map)``; a row axis is an int, None
  (the output does not read the rows) or :data:`rows.UNKNOWN`."""
  stand_in = _stand_ins(base)
  closed, inputs, out_tree = jc.trace(fn, stand_in, args, kwargs)
  n_params = len(jax.tree.leaves(stand_in))
  out_rows, _ = _row_analysis(closed, n_params, inputs)
  in_reads = [p in kernels for p, _ in leaves_with_paths(stand_in)]
  reads = rows.reads(closed.jaxpr,
                     in_reads + [False] * (len(inputs) - n_params))
  return (out_rows, [tuple(a.shape) for a in closed.out_avals], out_tree,
          reads, jc.holds(closed.jaxpr, jc.SHARD_MAP))


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
  row_plan = None
  if row_factors:
    out_rows, row_plan = _row_analysis(closed, n_params, inputs)
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
  plan = plans.plan(closed.jaxpr, [plans.Kernel.of(x) if isinstance(x, Lora)
                                   else None for x in inputs], ctx, row_plan)
  outs = evaluate(jc.Program(closed.jaxpr, tuple(closed.consts)), inputs, ctx,
                  plan=plan)
  return jax.tree.unflatten(out_tree, outs)
