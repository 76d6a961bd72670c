"""One walker for the forward analyses of a traced program.

Layout discovery and ``all-linear`` (:mod:`discover`), the row axes of a
mixed batch (:mod:`factored.rows`) and the factored engine's plan (sibling
groups and recompute regions, :mod:`factored.plan`) each give every
variable an abstract value and push values through the program equation by
equation, before anything is evaluated. What they
share lives here: the environment (literals, constants and unread variables
read as :meth:`Walker.empty`), recursion into sub-programs (a call, a remat
and a ``shard_map`` body are walked with the operands' values), and loops
iterated to their fixed point (:meth:`Walker.loop`). An analysis is a
subclass that says what a first-order equation does to its values and how
its values enter and leave a ``scan``, ``cond`` and ``while``.

Each walk of a program has a *frame* (:meth:`Walker.new_frame`) where the
analysis records what it finds per equation, keyed by the equation's
position: a program shared by two call sites is walked, and recorded, at
each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lora_jax._src import fixpoint
from lora_jax._src import jaxpr_core as jc


class Walker:
  """Walks a jaxpr with one abstract value per variable.

  Subclasses define :meth:`first_order`, :meth:`scan`, :meth:`cond` and
  :meth:`while_`, and may override :meth:`empty`, :meth:`new_frame`,
  :meth:`call`, :meth:`shard_map` and :meth:`unreadable`.
  """

  def empty(self) -> Any:
    """The value of a literal, a constant or a variable nothing wrote."""
    return None

  def new_frame(self) -> Any:
    """What one walk of one program records (None: nothing)."""
    return None

  def walk(self, jaxpr, ins: Sequence[Any]) -> tuple[list, Any]:
    """The values of ``jaxpr``'s outputs given its inputs', and the frame."""
    frame = self.new_frame()
    env = dict(zip(jaxpr.invars, ins))
    empty = self.empty()
    read = lambda v: empty if jc.is_literal(v) else env.get(v, empty)
    for i, eqn in enumerate(jaxpr.eqns):
      outs = self.visit(frame, i, eqn, [read(v) for v in eqn.invars])
      for v, out in zip(eqn.outvars, outs):
        if not jc.is_dropvar(v):
          env[v] = out
    return [read(v) for v in jaxpr.outvars], self.finish(frame, jaxpr, env)

  def visit(self, frame, i: int, eqn, ins: list) -> list:
    """The values of one equation's outputs."""
    try:
      sub = jc.higher_order(eqn)
    except jc.UnknownSchemaError as e:
      return self.unreadable(eqn, ins, e)
    if sub is None:
      return self.first_order(frame, i, eqn, ins)
    if isinstance(sub, (jc.Call, jc.Remat)):
      return self.call(frame, i, eqn, sub, ins)
    if isinstance(sub, jc.ShardMap):
      return self.shard_map(frame, i, eqn, sub, ins)
    if isinstance(sub, jc.Scan):
      return self.scan(frame, i, eqn, sub, ins)
    if isinstance(sub, jc.Cond):
      return self.cond(frame, i, eqn, sub, ins)
    if isinstance(sub, jc.While):
      return self.while_(frame, i, eqn, sub, ins)
    raise AssertionError(f"no walker rule for {type(sub).__name__}")

  # -- what an analysis defines -----------------------------------------------

  def first_order(self, frame, i: int, eqn, ins: list) -> list:
    raise NotImplementedError

  def scan(self, frame, i: int, eqn, sub: jc.Scan, ins: list) -> list:
    raise NotImplementedError

  def cond(self, frame, i: int, eqn, sub: jc.Cond, ins: list) -> list:
    raise NotImplementedError

  def while_(self, frame, i: int, eqn, sub: jc.While, ins: list) -> list:
    raise NotImplementedError

  def unreadable(self, eqn, ins: list, error: jc.UnknownSchemaError) -> list:
    """A higher-order equation whose parameters this JAX names otherwise."""
    del eqn, ins
    raise error

  def finish(self, frame, jaxpr, env: dict) -> Any:
    """What a walk of ``jaxpr`` returns as its frame, given the walk's frame
    and every variable's value (default: the frame)."""
    del jaxpr, env
    return frame

  def record(self, frame, i: int, frames: tuple) -> None:
    """Keeps the frames of equation ``i``'s sub-programs (default: not)."""
    del frame, i, frames

  # -- defaults ---------------------------------------------------------------

  def call(self, frame, i: int, eqn, sub, ins: list) -> list:
    """A call or remat: its body, walked with the operands' values."""
    del eqn
    outs, sub_frame = self.walk(sub.body.jaxpr, ins)
    self.record(frame, i, (sub_frame,))
    return outs

  def shard_map(self, frame, i: int, eqn, sub: jc.ShardMap, ins: list
                ) -> list:
    del eqn
    outs, sub_frame = self.walk(sub.body.jaxpr, ins)
    self.record(frame, i, (sub_frame,))
    return outs

  def loop(self, body, ins_for: Callable[[list], list], carry: list,
           join: Callable[[list, list], list], height: int, what: str
           ) -> tuple[list, list, Any]:
    """A loop body walked until its carry is a fixed point.

    Args:
      body: the body's jaxpr.
      ins_for: carry values -> the body's input values.
      carry: the carry's values on entry.
      join: ``(carry, body outputs) -> next carry``, monotone.
      height: how often the carry can still change (from the program's
        size; :func:`fixpoint.iterate`).
      what: for the error if it changes more often.

    Returns:
      ``(carry, the body's outputs, the body's frame)`` at the fixed point.
    """
    last: list = []

    def trip(c):
      outs, frame = self.walk(body, ins_for(c))
      last[:] = [outs, frame]
      return join(c, outs)
    carry = fixpoint.iterate(trip, list(carry), height, what)
    return carry, last[0], last[1]
