"""Runs of plain equations (no kernel among their operands) evaluated as one
shared, jitted function.

The interpreter binds every equation of the traced program again, under the
caller's transformations (``grad``: a linearization per equation). A deep
unscanned model repeats the same layer: the runs of plain equations between
its adapted matmuls are the same computation in every layer. Each run
becomes a ``jax.jit(..., inline=True)`` function kept (:data:`MAX_RUNS`,
least recently used dropped) under :func:`jaxpr_core.equations_key`, so JAX
traces, linearizes and transposes it once for all the layers; inlined, the
program it stages is the one binding each equation would stage.

A run stops at an equation with a kernel among its operands, at one with
effects, and at ``custom_jvp`` / ``custom_vjp`` calls (their rules are new
functions at every call, so they never share; bound as they are). A run on
concrete values (an eager call, nothing traced) is bound equation by
equation: there is nothing to trace, and a compiled run would compute with
XLA's algebra where the merge engine binds op by op.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax

from lora_jax._src import jaxpr_core as jc

# A run shorter than this is bound equation by equation: a jitted call and
# its key cost more than the binds they save.
MIN_RUN = 3

# The runs' functions, by key, the most recently used last. They hold
# equations only (no traced value), so they are kept across calls: JAX's own
# caches then serve a retrace, and an eager grad, from the first trace.
MAX_RUNS = 1024
_RUNS: collections.OrderedDict = collections.OrderedDict()


def last_uses(jaxpr) -> dict:
  """Each variable's last reader: an equation's position, or
  ``len(jaxpr.eqns)`` for the program's outputs."""
  last: dict = {}
  for i, e in enumerate(jaxpr.eqns):
    for v in e.invars:
      if not jc.is_literal(v):
        last[v] = i
  for v in jaxpr.outvars:
    if not jc.is_literal(v):
      last[v] = len(jaxpr.eqns)
  return last


def breaks_run(eqn) -> bool:
  """Equations bound on their own, whatever their operands."""
  return bool(eqn.effects) or eqn.primitive in jc.CUSTOM_JVP or (
      eqn.primitive in jc.CUSTOM_VJP)


def evaluate_run(eqns: list, env: dict, last: dict, end: int) -> None:
  """Evaluates ``eqns`` (a run of plain equations ending before position
  ``end``) into ``env``: through the shared function for its key, or
  equation by equation where it has none."""
  defined = {v for e in eqns for v in e.outvars}
  inputs: list = []
  seen: set = set()
  for e in eqns:
    for v in e.invars:
      if not jc.is_literal(v) and v not in defined and v not in seen:
        seen.add(v)
        inputs.append(v)
  if not any(isinstance(env[v], jax.core.Tracer) for v in inputs):
    # concrete values (an eager call): bound one by one, as the merge
    # engine's eager call binds them. A run compiled on its own gets XLA's
    # algebra (x + 0.0 folded to x: 1 / (-0.0 + 0.0) is -inf).
    jc.bind_into(eqns, env)
    return
  outputs = [v for e in eqns for v in e.outvars
             if not jc.is_dropvar(v) and last.get(v, -1) >= end]
  try:
    structure = jc.equations_key(eqns, inputs)
  except (jc.NoKey, jc.UnknownSchemaError):
    jc.bind_into(eqns, env)
    return
  position = {v: len(inputs) + k for k, v in enumerate(
      v for e in eqns for v in e.outvars)}
  key = (structure, tuple(position[v] for v in outputs))
  fn = _RUNS.get(key)
  if fn is None:
    fn = _RUNS[key] = jax.jit(_run_fn(eqns, inputs, outputs), inline=True)
    if len(_RUNS) > MAX_RUNS:
      _RUNS.popitem(last=False)
  else:
    _RUNS.move_to_end(key)
  env.update(zip(outputs, fn(*[env[v] for v in inputs])))


def _run_fn(eqns: list, inputs: list, outputs: list) -> Callable:
  def run(*vals: Any) -> list:
    local = dict(zip(inputs, vals))
    jc.bind_into(eqns, local)
    return [local[v] for v in outputs]
  return run

