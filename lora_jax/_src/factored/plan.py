"""The analyses that run before evaluation, and the immutable plan they give.

Before the interpreter evaluates a program, one :class:`walk.Walker`
analysis follows every adapted kernel through it as an abstract
:class:`Kernel` (its path, layout, rank, whether it has per-row factors,
DoRA or dropout: what evaluation will carry, without the arrays) and
records, per program and per call site, by equation position:

* ``dots``: the row axes of each ``dot_general`` in a mixed batch run whole
  (:mod:`rows`, walked first; its plan is paired with this one by position);
* ``heads``: each adapted matmul that starts a joint computation: the
  siblings projecting the same input (:mod:`siblings`: one matmul against
  the concatenated ``a``s, per-row factors included) and the recompute
  region computing that input (:mod:`recompute`);
* ``subs``: the plans of its sub-programs (a call's body, a scan's body,
  each branch of a cond, a while's cond and body, a shard_map body).

Evaluation reads the plan and forms nothing itself. A program shared by two
call sites (a jitted helper called twice) is walked at each, so each site
gets its own groups, regions and row axes. The interpreter checks that what
it evaluates is what was planned (the same kernel, path and layout at each
planned matmul); a disagreement is an error, never a silent other result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import types
from typing import Any

import jax

from lora_jax._src import jaxpr_core as jc
from lora_jax._src import walk
from lora_jax._src.factored import recompute
from lora_jax._src.factored import siblings
from lora_jax._src.factored.rows import RowPlan
from lora_jax._src.layouts import Layout


@dataclasses.dataclass(frozen=True)
class Kernel:
  """An adapted kernel as the analysis sees it: what evaluation's
  :class:`values.Lora` will hold, less the arrays.

  Attributes:
    path: the base leaf's path.
    layout: the roles of the axes of the value (after views).
    shape: the value's shape (its variable's).
    rank: the factors' rank.
    rows: per-row factors (a mixed batch run whole).
    dora: the adapter has a DoRA magnitude.
    dropout: LoRA dropout's rate.
  """
  path: str
  layout: Layout
  shape: tuple
  rank: int
  rows: bool = False
  dora: bool = False
  dropout: float = 0.0

  @classmethod
  def of(cls, lora) -> Kernel:
    """The abstract value of a :class:`values.Lora`."""
    return cls(lora.path, lora.layout, tuple(lora.w.shape),
               int(lora.a.shape[-1]), lora.rows, lora.magnitude is not None,
               lora.dropout)

  # The cost model (``ctx.choose``) reads a kernel's ``w.shape`` and its
  # rank as ``a.shape[-1]``: shapes only.
  @property
  def w(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(self.shape, jax.numpy.float32)

  @property
  def a(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.rank,), jax.numpy.float32)

  @property
  def magnitude(self) -> bool | None:
    return True if self.dora else None


@dataclasses.dataclass(frozen=True)
class Head:
  """Adapted matmuls computed together at the first of them.

  Attributes:
    members: positions of the ``dot_general`` equations, the head first.
      More than one: siblings projecting the same input.
    kernels: each member's kernel, as planned.
    x_rows: the shared input's row axis (per-row factors), else None.
    region: ``(equation positions, root variables)`` recomputing the
      shared input in the backward pass (:mod:`recompute`), else None.
    early: positions of later view equations (a widening cast or transpose
      of a member's kernel next to its matmul, as Flax layers write it)
      that the head evaluates first, so that every member's kernel exists.
    project: the members' ``x @ a`` are computed by the head
      (:func:`siblings.project_group`): siblings, or a lone plain projection
      whose input is recomputed (its backward pass then reuses the forward
      pass's product instead of computing it again).
  """
  members: tuple[int, ...]
  kernels: tuple[Kernel, ...]
  x_rows: int | None = None
  region: tuple | None = None
  early: tuple[int, ...] = ()
  project: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the analyses found in one program at one call site (immutable).

  Attributes:
    jaxpr: the program this plan is for (evaluation checks it).
    dots: equation position -> ``(lhs row axis, rhs row axis)`` of each
      ``dot_general`` reading rows (a mixed batch run whole).
    heads: equation position -> :class:`Head`.
    members: equation position of each head's later members -> the head's.
    subs: equation position -> the plans of its sub-programs, in the order
      :func:`jaxpr_core.higher_order` lists them.
  """
  jaxpr: Any
  dots: Mapping[int, tuple]
  heads: Mapping[int, Head]
  members: Mapping[int, int]
  subs: Mapping[int, tuple[Plan | None, ...]]

  def sub(self, i: int, program) -> Plan:
    """The plan of equation ``i``'s sub-program ``program``."""
    for p in self.subs.get(i, ()):
      if p is not None and p.jaxpr is program.jaxpr:
        return p
    raise AssertionError(
        f"lora_jax: no plan for a sub-program of equation {i} that the "
        f"interpreter evaluates with a kernel: the analysis and evaluation "
        f"disagree (a bug in lora_jax; mode='merge' avoids it).")


def _frozen(d: dict) -> Mapping:
  return types.MappingProxyType(dict(d))


@dataclasses.dataclass
class _Frame:
  rows: RowPlan | None
  dots: dict = dataclasses.field(default_factory=dict)  # i -> (lhs, rhs)
  subs: dict = dataclasses.field(default_factory=dict)


def _cuts_ok(k: Kernel, cuts) -> bool:
  """Whether cutting kernel axes ``cuts`` keeps it symbolic (views._cut:
  DoRA's per-output magnitude cannot be cut along an input axis)."""
  return not k.dora or all(k.layout.magnitude_axis(a) is not None
                           for a in cuts)


def _view(eqn, ins: list) -> list | None:
  """The kernels a view rule (:mod:`views`) leaves in its outputs; None if
  ``eqn`` is no view."""
  prim, outs = eqn.primitive, eqn.outvars
  k = ins[0]
  shaped = lambda x, v: (dataclasses.replace(x, shape=tuple(v.aval.shape))
                         if isinstance(x, Kernel) else None)
  if prim in jc.PASS:
    return [shaped(x, v) for x, v in zip(ins, outs)]
  if prim in jc.ON_KERNEL:
    return [shaped(x, v) for x, v in zip(ins, outs)]
  if prim in jc.ON_EVERY_PART or prim in jc.CAST:
    return [shaped(k, outs[0])]
  if not isinstance(k, Kernel):  # a kernel only in an index operand
    return None
  lay = k.layout
  if prim in jc.TRANSPOSE:
    pos = {old: new for new, old in enumerate(jc.transpose_perm(eqn))}
    moved = lambda axes: tuple(pos[a] for a in axes)
    k = dataclasses.replace(k, layout=Layout(
        moved(lay.batch), moved(lay.inputs), moved(lay.outputs)))
    return [shaped(k, outs[0])]
  if prim in jc.SLICE:
    start, limit, strides = jc.slice_params(eqn)
    cuts = [a for a, (s, l, st, d) in enumerate(
        zip(start, limit, strides, k.shape)) if (s, l, st) != (0, d, 1)]
    return [shaped(k, outs[0]) if _cuts_ok(k, cuts) else None]
  if prim in jc.DYNAMIC_SLICE:
    if any(isinstance(x, Kernel) for x in ins[1:]):
      return [None]
    cuts = [a for a, (n, d) in enumerate(
        zip(jc.dynamic_slice_sizes(eqn), k.shape)) if n != d]
    return [shaped(k, outs[0]) if _cuts_ok(k, cuts) else None]
  if prim in jc.SQUEEZE:
    dims = jc.squeeze_dims(eqn)
    if not set(dims) <= set(lay.batch):
      return [None]
    renumber = lambda axes: tuple(a - sum(d < a for d in dims)
                                  for a in axes if a not in dims)
    k = dataclasses.replace(k, layout=Layout(
        renumber(lay.batch), renumber(lay.inputs), renumber(lay.outputs)))
    return [shaped(k, outs[0])]
  return None


def _scan_step(k: Kernel | None) -> Kernel | None:
  """A scanned operand's per-step kernel (``programs._drop_leading``), or
  None where the scan merges it (axis 0 is not a batch axis)."""
  if not isinstance(k, Kernel) or 0 not in k.layout.batch:
    return None
  lay = k.layout
  i = lay.batch.index(0)
  dec = lambda axes: tuple(a - 1 for a in axes)
  return dataclasses.replace(
      k, shape=k.shape[1:],
      layout=Layout(dec(lay.batch[:i] + lay.batch[i + 1:]), dec(lay.inputs),
                    dec(lay.outputs)))


class _Planner(walk.Walker):
  """Walks a program with an abstract :class:`Kernel` (or None) per
  variable; each walk of a program gives its :class:`Plan`.

  ``ctx``: the evaluation's settings that decide grouping and recomputing
  (``choose``, ``recompute``, whether dropout draws keys)."""

  def __init__(self, ctx, rows: RowPlan | None):
    self.ctx = ctx
    self._rows: list = [rows]

  def new_frame(self) -> _Frame:
    return _Frame(self._rows[-1])

  def walk(self, jaxpr, ins):
    # a kernel entering a sub-program has the shape of the body's variable
    # (shard_map: one shard's)
    ins = [dataclasses.replace(x, shape=tuple(v.aval.shape))
           if isinstance(x, Kernel) else x
           for x, v in zip(ins, jaxpr.invars)]
    return super().walk(jaxpr, ins)

  def visit(self, frame, i, eqn, ins):
    if not any(isinstance(x, Kernel) for x in ins):
      return [None] * len(eqn.outvars)  # the interpreter binds it as traced
    return super().visit(frame, i, eqn, ins)

  def unreadable(self, eqn, ins, error):
    del ins, error
    return [None] * len(eqn.outvars)  # a counted fallback: merged

  def _walk_sub(self, frame: _Frame, i: int, k: int, body, ins: list):
    rows = frame.rows.subs.get(i, ()) if frame.rows is not None else ()
    self._rows.append(rows[k] if k < len(rows) else None)
    try:
      return self.walk(body.jaxpr, ins)
    finally:
      self._rows.pop()

  def first_order(self, frame, i, eqn, ins):
    if eqn.primitive in jc.DOT:
      frame.dots[i] = tuple(ins)
    outs = _view(eqn, ins)
    # a consumer's result, or a kernel merged for an op without a rule
    return [None] * len(eqn.outvars) if outs is None else outs

  def call(self, frame, i, eqn, sub, ins):
    outs, body = self._walk_sub(frame, i, 0, sub.body, ins)
    frame.subs[i] = (body,)
    if isinstance(sub, jc.Call):  # inlined: kernels flow out
      return outs
    return [None] * len(eqn.outvars)  # remat: evaluated to arrays

  def shard_map(self, frame, i, eqn, sub, ins):
    frame.subs[i] = (self._walk_sub(frame, i, 0, sub.body, ins)[1],)
    return [None] * len(eqn.outvars)

  def scan(self, frame, i, eqn, sub, ins):
    nc, ncarry = sub.num_consts, sub.num_carry
    body_ins = [*ins[:nc], *[None] * ncarry,  # the carry is merged
                *[_scan_step(x) for x in ins[nc + ncarry:]]]
    frame.subs[i] = (self._walk_sub(frame, i, 0, sub.body, body_ins)[1],)
    return [None] * len(eqn.outvars)

  def cond(self, frame, i, eqn, sub, ins):
    frame.subs[i] = tuple(self._walk_sub(frame, i, k, b, ins[1:])[1]
                          for k, b in enumerate(sub.branches))
    return [None] * len(eqn.outvars)

  def while_(self, frame, i, eqn, sub, ins):
    cn, bn = sub.cond_nconsts, sub.body_nconsts
    carry = [None] * (len(ins) - cn - bn)  # merged
    frame.subs[i] = (
        self._walk_sub(frame, i, 0, sub.cond, [*ins[:cn], *carry])[1],
        self._walk_sub(frame, i, 1, sub.body, [*ins[cn:cn + bn], *carry])[1])
    return [None] * len(eqn.outvars)

  def finish(self, frame: _Frame, jaxpr, env: dict) -> Plan:
    dots = dict(frame.rows.dots) if frame.rows is not None else {}
    heads, members = self._heads(jaxpr, frame.dots, dots, env)
    return Plan(jaxpr, _frozen(dots), _frozen(heads), _frozen(members),
                _frozen(frame.subs))

  def _heads(self, jaxpr, dot_ins: dict, dots: dict, env: dict):
    """Sibling groups and recompute regions of one program."""
    eqns, ctx = jaxpr.eqns, self.ctx
    producers = {v: i for i, e in enumerate(eqns) for v in e.outvars
                 if not jc.is_dropvar(v)}
    # siblings: plain projections of one input, grouped by (input,
    # contraction, row axis); a member's kernel must exist at the head, or
    # be views (a widening cast, a transpose) of kernels that do, which
    # the head then evaluates early
    by_key: dict = {}
    keys: dict = {}
    for i, ins in sorted(dot_ins.items()):
      try:
        p = siblings.projection(eqns[i], ins, ctx, dots.get(i))
      except jc.UnknownSchemaError:
        p = None  # the rule falls back for this equation
      if p is not None:
        keys[i] = p[:3]
        by_key.setdefault(p[:3], []).append(i)
    groups: dict = {}
    grouped: dict = {}
    hoist: dict = {}
    for cands in by_key.values():
      left = list(cands)
      while left:
        head = left[0]
        rest: list[int] = []
        found, early = [head], set()
        for j in left[1:]:
          views = _early_views(eqns[j].invars[1], head, eqns, producers, env)
          if views is None:
            rest.append(j)
          else:
            found.append(j)
            early.update(views)
        left = rest
        if len(found) > 1:
          groups[head] = tuple(found)
          grouped.update({j: head for j in found[1:]})
          hoist[head] = tuple(sorted(early))
    uses = None
    heads: dict = {}
    for i, ins in sorted(dot_ins.items()):
      if i in grouped:
        continue
      members = groups.get(i, (i,))
      region = None
      kernels = [x for x in ins if isinstance(x, Kernel)]
      if (ctx.recompute and len(ins) == 2 and len(kernels) == 1
          and not ctx.dropping(kernels[0])):
        if uses is None:
          uses = recompute.use_counts(jaxpr)
        x_var = eqns[i].invars[1 if isinstance(ins[0], Kernel) else 0]
        found = recompute.input_region(
            x_var, eqns, producers, uses,
            lambda v: isinstance(env.get(v), Kernel), len(members))
        if found is not None:
          region = (tuple(found[0]), tuple(found[1]))
      if len(members) > 1 or region is not None:
        project = len(members) > 1 or i in keys
        heads[i] = Head(members,
                        tuple(_kernel_of(dot_ins[j]) for j in members),
                        keys[i][2] if project else None, region,
                        hoist.get(i, ()), project)
    return heads, grouped


def _early_views(var, head: int, eqns, producers: dict, env: dict
                 ) -> list[int] | None:
  """Positions of the view equations (after ``head``) that compute kernel
  ``var`` from values existing at equation ``head``; None if it needs
  anything else (a value computed after the head, a consumer, a call)."""
  need: set = set()
  todo = [var]
  while todo:
    v = todo.pop()
    if jc.is_literal(v):
      continue
    p = producers.get(v)
    if p is None or p < head or p in need:
      continue
    e = eqns[p]
    if not isinstance(env.get(v), Kernel):
      return None
    try:
      is_view = _view(e, [None if jc.is_literal(u) else env.get(u)
                          for u in e.invars]) is not None
    except jc.UnknownSchemaError:
      return None
    if not is_view:
      return None
    need.add(p)
    todo.extend(e.invars)
  return sorted(need)


def _kernel_of(ins) -> Kernel:
  return next(x for x in ins if isinstance(x, Kernel))


def plan(jaxpr, kernels: list, ctx, rows: RowPlan | None = None) -> Plan:
  """The plan of ``jaxpr`` given each input's abstract kernel (or None).

  Args:
    jaxpr: the traced program.
    kernels: per input, a :class:`Kernel` or None.
    ctx: the evaluation's :class:`values.Context` (its settings decide
      grouping and recomputing).
    rows: the row analysis' plan of the same program (a mixed batch run
      whole), else None.
  """
  return _Planner(ctx, rows).walk(jaxpr, kernels)[1]


def check(plan_: Plan, i: int, eqn, kernel_of: Callable[[int], Any]) -> None:
  """Raises if the kernels evaluation holds at head ``i``'s members are not
  the planned ones (a bug: the analysis and evaluation disagree)."""
  head = plan_.heads[i]
  for j, want in zip(head.members, head.kernels):
    got = kernel_of(j)
    if got is None or (got.path, got.layout, got.rows) != (
        want.path, want.layout, want.rows):
      raise AssertionError(
          f"lora_jax: equation {j} ({str(eqn)[:200]}) was planned with "
          f"kernel {want.path!r} {want.layout} but evaluates "
          f"{'no kernel' if got is None else repr(got.path)}: the analysis "
          f"and evaluation disagree (a bug in lora_jax; mode='merge' avoids "
          f"it).")
