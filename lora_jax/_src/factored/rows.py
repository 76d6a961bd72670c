"""Row axes for mixed-adapter batches without ``vmap``.

A mixed batch runs row ``i`` with adapter ``ids[i]``. Under ``vmap`` over rows
JAX tracks the rows for us, but XLA:CPU then runs every low-rank matmul as
small per-row batched products (1.25x merged inference on W1). Run instead on
the whole batch, the frozen matmuls are the model's own and each low-rank
branch is one batched product over rows (1.11x) — if the engine knows which
axis of each adapted matmul's input is the row axis. This module says: every
array argument has its rows on axis 0, and the axis is followed through the
program by one rule per primitive. Where it cannot be followed (a reduction
over the rows, a reshape that merges them, an op without a rule), the value
is :data:`UNKNOWN`; an adapted matmul reading such an input makes the call
fall back to ``vmap`` (``values.NeedsRowVmap``).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
import types

from lora_jax._src import jaxpr_core as jc
from lora_jax._src import walk


class _Unknown:
  """The row axis of a value whose rows cannot be followed."""

  def __repr__(self) -> str:
    return "UNKNOWN"


UNKNOWN = _Unknown()


@dataclasses.dataclass(frozen=True)
class RowPlan:
  """What the analysis found in one program at one call site.

  ``dots``: equation index -> ``(lhs row axis, rhs row axis)`` of every
  ``dot_general`` reading rows; ``subs``: equation index -> the plans of its
  sub-programs (an inlined call's body, a scan's body at its fixed point).
  Keyed by position, so a jaxpr shared by two call sites (a jitted helper
  called twice) gets a plan at each.
  """
  dots: Mapping[int, tuple] = dataclasses.field(default_factory=dict)
  subs: Mapping[int, tuple[RowPlan, ...]] = dataclasses.field(
      default_factory=dict)


def _shape(v) -> tuple[int, ...]:
  return tuple(v.aval.shape)


def _reshape(eqn, r):
  src, dst = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  before = math.prod(src[:r])
  for j in range(len(dst)):
    if math.prod(dst[:j]) == before and dst[j] == src[r]:
      return j
  return UNKNOWN


def _dot(eqn, ins):
  d = jc.dot_dims(eqn)
  lhs_nd, rhs_nd = (len(_shape(v)) for v in eqn.invars[:2])
  lhs_free = [i for i in range(lhs_nd) if i not in d.lhs_contract + d.lhs_batch]
  rhs_free = [i for i in range(rhs_nd) if i not in d.rhs_contract + d.rhs_batch]
  out = set()
  for r, contract, batch, free, offset in (
      (ins[0], d.lhs_contract, d.lhs_batch, lhs_free, len(d.lhs_batch)),
      (ins[1], d.rhs_contract, d.rhs_batch, rhs_free,
       len(d.lhs_batch) + len(lhs_free))):
    if r is None:
      continue
    if r == UNKNOWN or r in contract:
      return UNKNOWN
    out.add(batch.index(r) if r in batch else offset + free.index(r))
  return out.pop() if len(out) == 1 else UNKNOWN


def _gather(eqn, ins):
  operand, indices = ins[0], ins[1]
  g = jc.gather_dims(eqn)
  idx_nd = len(_shape(eqn.invars[1]))
  if (operand is not None or indices == UNKNOWN or g.operand_batching_dims
      or indices >= idx_nd - 1):
    return UNKNOWN
  out_nd = len(_shape(eqn.outvars[0]))
  batch_positions = [i for i in range(out_nd) if i not in g.offset_dims]
  return batch_positions[indices]


def _one(eqn, ins):
  """The row axis of a single-output equation's result."""
  prim = eqn.primitive
  r = next((x for x in ins if x is not None), None)
  if any(x is UNKNOWN for x in ins):
    return UNKNOWN
  if prim in jc.DOT:
    return _dot(eqn, ins)
  if prim in jc.GATHER:
    return _gather(eqn, ins)
  if len({x for x in ins if x is not None}) != 1:
    return UNKNOWN
  out_shape = _shape(eqn.outvars[0])
  if prim in jc.ELEMENTWISE:
    # operands carrying rows: the output's shape, or size-1 axes broadcast
    # (newer JAX lets elementwise ops broadcast those) but never the rows
    same = all(x is None or (
        len(_shape(v)) == len(out_shape) and _shape(v)[r] == out_shape[r]
        and all(a in (b, 1) for a, b in zip(_shape(v), out_shape)))
               for v, x in zip(eqn.invars, ins))
    return r if same else UNKNOWN
  if ins[0] is None:  # rows only in an index / size operand
    return UNKNOWN
  if prim in jc.BROADCAST:
    return jc.broadcast_dims(eqn)[r]
  if prim in jc.RESHAPE:
    return _reshape(eqn, r)
  if prim in jc.TRANSPOSE:
    return jc.transpose_perm(eqn).index(r)
  if prim in jc.SQUEEZE:
    dims = jc.squeeze_dims(eqn)
    return UNKNOWN if r in dims else r - sum(d < r for d in dims)
  if prim in jc.SLICE or prim in jc.DYNAMIC_SLICE:
    return r if out_shape[r] == _shape(eqn.invars[0])[r] else UNKNOWN
  if prim in jc.REDUCE:
    axes = jc.reduce_axes(eqn)
    return UNKNOWN if r in axes else r - sum(a < r for a in axes)
  if prim in jc.CUMULATIVE:
    return UNKNOWN if jc.cumulative_axis(eqn) == r else r
  if prim in jc.SPLIT:  # (one output per part: handled by analyse)
    return UNKNOWN
  if prim in jc.CONCATENATE:
    ok = all(x == r for x in ins) and jc.concatenate_dim(eqn) != r
    return r if ok else UNKNOWN
  return UNKNOWN


class _Rows(walk.Walker):
  """The row-axis analysis: a value is a variable's row axis (an int), None
  (no rows) or :data:`UNKNOWN`; each walk of a program records a
  :class:`RowPlan`."""

  def new_frame(self) -> RowPlan:
    return RowPlan({}, {})

  def record(self, frame: RowPlan, i: int, frames: tuple) -> None:
    frame.subs[i] = frames  # type: ignore[index]

  def finish(self, frame: RowPlan, jaxpr, env) -> RowPlan:
    del jaxpr, env  # the walk's records, read-only from here on
    return RowPlan(types.MappingProxyType(dict(frame.dots)),
                   types.MappingProxyType(dict(frame.subs)))

  def unreadable(self, eqn, ins, error):
    del ins, error
    return [UNKNOWN] * len(eqn.outvars)

  def visit(self, frame, i, eqn, ins):
    if all(x is None for x in ins):  # nothing here reads the rows
      return [None] * len(eqn.outvars)
    return super().visit(frame, i, eqn, ins)

  def first_order(self, frame, i, eqn, ins):
    prim = eqn.primitive
    if prim in jc.DOT:
      frame.dots[i] = (ins[0], ins[1])
    identity = (prim in jc.PASS or prim in jc.ON_KERNEL
                or prim in jc.ON_EVERY_PART)
    if identity and len(eqn.outvars) == len(ins):
      return list(ins)  # copies, barriers, stop_gradient, sharding constraints
    if prim in jc.SPLIT:  # parts along another axis keep the rows
      r = ins[0]
      ok = isinstance(r, int) and jc.split_axis(eqn) != r
      return [r if ok else UNKNOWN] * len(eqn.outvars)
    if len(eqn.outvars) != 1:
      return [UNKNOWN] * len(eqn.outvars)
    return [_one(eqn, ins)]

  def shard_map(self, frame, i, eqn, sub, ins):  # rows are not followed
    return [UNKNOWN] * len(eqn.outvars)

  def cond(self, frame, i, eqn, sub, ins):
    return [UNKNOWN] * len(eqn.outvars)

  def while_(self, frame, i, eqn, sub, ins):
    return [UNKNOWN] * len(eqn.outvars)

  def scan(self, frame, i, eqn, sub, ins):
    """A scan over layers: rows in the carry (and in the scanned operands,
    one axis further in) stay put from step to step; stacked outputs gain
    the scanned axis in front."""
    nc, ncarry = sub.num_consts, sub.num_carry
    step = lambda r: (None if r is None else UNKNOWN if r in (UNKNOWN, 0)
                      else r - 1)
    xs = [step(r) for r in ins[nc + ncarry:]]
    # the carry's rows must be a fixed point of the body; a slot only ever
    # changes to UNKNOWN: at most ncarry changes
    carry, outs, body = self.loop(
        sub.body.jaxpr, lambda c: [*ins[:nc], *c, *xs], ins[nc:nc + ncarry],
        lambda c, o: [a if a == b else UNKNOWN for a, b in zip(c, o)],
        ncarry, "a scan carry's row axes")
    self.record(frame, i, (body,))
    ys = [None if r is None else UNKNOWN if r is UNKNOWN else r + 1
          for r in outs[ncarry:]]
    return [*carry, *ys]


def analyse(jaxpr, in_rows) -> tuple[list, RowPlan]:
  """Row axes of ``jaxpr``'s outputs given its inputs' (``None``: no rows;
  :data:`UNKNOWN`: rows that cannot be followed), and the :class:`RowPlan`
  of this call site."""
  return _Rows().walk(jaxpr, in_rows)


class _Reads(walk.Walker):
  """Which values read any of some inputs (a value is a bool). Loops and
  branches are taken whole: every output of one reads what any operand
  reads (a sound over-approximation)."""

  def empty(self) -> bool:
    return False

  def first_order(self, frame, i, eqn, ins):
    return [any(ins)] * len(eqn.outvars)

  def scan(self, frame, i, eqn, sub, ins):
    return [any(ins)] * len(eqn.outvars)

  cond = while_ = scan

  def unreadable(self, eqn, ins, error):
    return [any(ins)] * len(eqn.outvars)


def reads(jaxpr, in_flags) -> list:
  """For each output of ``jaxpr``, whether it reads an input flagged True."""
  return _Reads().walk(jaxpr, in_flags)[0]
