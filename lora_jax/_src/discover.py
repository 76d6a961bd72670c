"""Layout discovery: how an apply function consumes each kernel.

``discover_layouts`` traces the function abstractly (``jax.make_jaxpr``: no
FLOPs) and follows every kernel through the program: through views that keep
its data (``transpose``, ``reshape``, ``convert_element_type``, slicing, ...)
and into sub-programs (``jit``, ``scan``, ``remat``, ``cond``, ``while``,
``custom_jvp``/``custom_vjp``), up to the op that consumes it: a
``dot_general``, a ``conv_general_dilated`` or a row ``gather``. Those ops say
which kernel axes are contracted (inputs), kept (outputs) or batched.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Sequence

from jax.extend import core as jex

from lora_jax._src.layouts import Layout
from lora_jax._src.tracing import trace

# Ops that return their operand's data in the same axis order.
_IDENTITY_OPS = frozenset({
    "convert_element_type", "copy", "copy_p", "reduce_precision",
    "sharding_constraint", "optimization_barrier", "stop_gradient",
    "device_put", "pvary", "mesh_cast", "reshard",
})
_SLICE_OPS = frozenset({"slice", "dynamic_slice"})


@dataclasses.dataclass(frozen=True)
class _Tracked:
  """A value derived from kernel ``leaf``: for each of its axes, the kernel
  axes it holds; ``dropped`` are kernel axes already indexed away (batch)."""
  leaf: int
  axes: tuple[frozenset, ...]
  dropped: frozenset = frozenset()


@dataclasses.dataclass
class Use:
  """One consumer of a kernel: the op and the role of every kernel axis."""
  primitive: str
  roles: dict | None  # kernel axis -> "batch" | "inputs" | "outputs"; None: no rule


def _reshape(t: _Tracked, old: Sequence[int], new: Sequence[int]) -> _Tracked:
  """Axis correspondence of a reshape, by groups of equal element count."""
  dropped = set(t.dropped)
  keep_old = [i for i, d in enumerate(old) if d != 1]
  for i, d in enumerate(old):
    if d == 1:
      dropped |= t.axes[i]
  keep_new = [j for j, d in enumerate(new) if d != 1]

  def prefix(shape, idx):
    p, out = 1, [1]
    for i in idx:
      p *= shape[i]
      out.append(p)
    return out
  po, pn = prefix(old, keep_old), prefix(new, keep_new)
  common = sorted(set(po) & set(pn))

  def group(start):
    return bisect.bisect_right(common, start) - 1
  members: dict[int, frozenset] = {}
  for k, i in enumerate(keep_old):
    g = group(po[k])
    members[g] = members.get(g, frozenset()) | t.axes[i]
  axes = [frozenset()] * len(new)
  for k, j in enumerate(keep_new):
    axes[j] = members.get(group(pn[k]), frozenset())
  return _Tracked(t.leaf, tuple(axes), frozenset(dropped))


def _roles(t: _Tracked, role_of_axis: dict[int, str]) -> dict | None:
  roles: dict[int, str] = {k: "batch" for k in t.dropped}
  for pos, kernel_axes in enumerate(t.axes):
    role = role_of_axis.get(pos)
    for k in kernel_axes:
      if role is None or roles.get(k, role) != role:
        return None
      roles[k] = role
  return roles


class _Analysis:

  def __init__(self, num_leaves: int):
    self.uses: list[list[Use]] = [[] for _ in range(num_leaves)]

  def use(self, t: _Tracked, prim: str, role_of_axis: dict[int, str] | None):
    roles = None if role_of_axis is None else _roles(t, role_of_axis)
    self.uses[t.leaf].append(Use(prim, roles))

  def run(self, jaxpr: jex.Jaxpr, tracked_in: Sequence[_Tracked | None]):
    """Walks ``jaxpr``; returns the tracked values of its outputs."""
    env: dict[Any, _Tracked] = {}
    for v, t in zip(jaxpr.invars, tracked_in):
      if t is not None:
        env[v] = t
    get = lambda v: None if isinstance(v, jex.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
      ins = [get(v) for v in eqn.invars]
      if not any(t is not None for t in ins):
        continue
      outs = self.eqn(eqn, ins)
      for v, t in zip(eqn.outvars, outs):
        if t is not None and not isinstance(v, jex.DropVar):
          env[v] = t
    return [get(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins) -> list:
    name = eqn.primitive.name
    p = eqn.params
    none = [None] * len(eqn.outvars)
    t = next(t for t in ins if t is not None)
    if name in _IDENTITY_OPS:
      return list(ins[:len(eqn.outvars)])
    if name == "transpose":
      perm = p["permutation"]
      return [dataclasses.replace(t, axes=tuple(t.axes[i] for i in perm))]
    if name == "reshape":
      old = eqn.invars[0].aval.shape
      return [_reshape(t, old, eqn.outvars[0].aval.shape)]
    if name == "squeeze":
      dims = set(d % len(t.axes) for d in p["dimensions"])
      dropped = t.dropped.union(*(t.axes[d] for d in dims))
      return [_Tracked(t.leaf, tuple(a for i, a in enumerate(t.axes)
                                     if i not in dims), dropped)]
    if name == "expand_dims":
      return [_reshape(t, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]
    if name == "broadcast_in_dim" and ins[0] is t:
      axes = [frozenset()] * len(p["shape"])
      for k, d in enumerate(p["broadcast_dimensions"]):
        axes[d] = t.axes[k]
      return [_Tracked(t.leaf, tuple(axes), t.dropped)]
    if name in _SLICE_OPS and ins[0] is t:
      return [t]
    if name == "dot_general":
      return self.dot_general(eqn, ins)
    if name == "conv_general_dilated":
      return self.conv(eqn, ins)
    if name == "gather" and ins[0] is t:
      return self.gather(eqn, t)
    if name == "scan":
      return self.scan(eqn, ins)
    if name == "while":
      return self.while_(eqn, ins)
    if name == "cond":
      for branch in p["branches"]:
        self.run(branch.jaxpr, ins[1:])
      return none
    sub = _call_jaxpr(eqn)
    if sub is not None:
      return self.run(sub, ins)
    for t in ins:
      if t is not None:
        self.use(t, name, None)
    return none

  def dot_general(self, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for t, contract, batch in ((ins[0], lc, lb), (ins[1], rc, rb)):
      if t is None:
        continue
      role = {a: "outputs" for a in range(len(t.axes))}
      role.update({a: "inputs" for a in contract})
      role.update({a: "batch" for a in batch})
      self.use(t, "dot_general", role)
    return [None]

  def conv(self, eqn, ins):
    if ins[0] is not None:
      self.use(ins[0], "conv_general_dilated (kernel as lhs)", None)
    if ins[1] is not None:
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec
      role = {a: "inputs" for a in rhs_spec[1:]}
      role[rhs_spec[0]] = "outputs"
      self.use(ins[1], "conv_general_dilated", role)
    return [None]

  def gather(self, eqn, t):
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    role = {}
    for a in range(len(shape)):
      if a in dn.operand_batching_dims:
        role[a] = "batch"
      elif a in dn.start_index_map:
        role[a] = "inputs"
      elif sizes[a] == shape[a]:
        role[a] = "outputs"
      else:
        role = None
        break
    if role is not None and "inputs" not in role.values():
      role = None
    self.use(t, "gather", role)
    return [None]

  def scan(self, eqn, ins):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    body_in = list(ins[:nc])
    for t in ins[nc:nc + ncarry]:
      if t is not None:
        self.use(t, "scan (kernel in the carry)", None)
      body_in.append(None)
    for t in ins[nc + ncarry:]:
      body_in.append(None if t is None else _Tracked(
          t.leaf, t.axes[1:], t.dropped | t.axes[0]))
    self.run(p["jaxpr"].jaxpr, body_in)
    return [None] * len(eqn.outvars)

  def while_(self, eqn, ins):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn:]
    for t in carry:
      if t is not None:
        self.use(t, "while (kernel in the carry)", None)
    self.run(p["cond_jaxpr"].jaxpr, list(ins[:cn]) + [None] * len(carry))
    self.run(p["body_jaxpr"].jaxpr, list(ins[cn:cn + bn]) + [None] * len(carry))
    return [None] * len(eqn.outvars)


def _call_jaxpr(eqn) -> jex.Jaxpr | None:
  """The sub-program of a call-like op whose inputs are the op's inputs."""
  for value in eqn.params.values():
    jaxpr = value.jaxpr if isinstance(value, jex.ClosedJaxpr) else value
    if isinstance(jaxpr, jex.Jaxpr) and len(jaxpr.invars) == len(eqn.invars):
      return jaxpr
  return None


def trace_uses(apply_fn: Callable, params: Any, example_args: Sequence[Any],
               example_kwargs: dict | None, leaf_indices: Sequence[int]
               ) -> list[list[Use]]:
  """The consumers of selected leaves of ``params`` in ``apply_fn``."""
  closed, _, _ = trace(apply_fn, params, tuple(example_args),
                       dict(example_kwargs or {}))
  jaxpr = closed.jaxpr
  tracked: list[_Tracked | None] = [None] * len(jaxpr.invars)
  for n, i in enumerate(leaf_indices):
    ndim = len(jaxpr.invars[i].aval.shape)
    tracked[i] = _Tracked(n, tuple(frozenset({k}) for k in range(ndim)))
  analysis = _Analysis(len(leaf_indices))
  analysis.run(jaxpr, tracked)
  return analysis.uses


def layout_from_uses(path: str, ndim: int, uses: list[Use]) -> Layout:
  """One layout from all consumers of a kernel, or an error that says why not.

  A row gather (embedding lookup) fixes the layout of a table that is also
  used as a tied output head; otherwise all resolved consumers must agree.
  """
  resolved = [u for u in uses if u.roles is not None]
  hint = (f"Pass it explicitly: LoraConfig(layouts={{{path!r}: "
          f"lora_jax.Layout(batch=..., inputs=..., outputs=...)}}), or exclude "
          f"the leaf from targets.")
  if not resolved:
    what = ", ".join(sorted({u.primitive for u in uses})) or "nothing"
    raise ValueError(
        f"Cannot infer the layout of {path!r} (ndim {ndim}): in the traced "
        f"apply function it is consumed by {what}, which does not say which "
        f"axes are inputs and outputs. {hint}")
  gathers = [u for u in resolved if u.primitive == "gather"]
  chosen = (gathers or resolved)[0]
  if not gathers:
    for u in resolved[1:]:
      if u.roles != chosen.roles:
        raise ValueError(
            f"{path!r} is consumed with conflicting layouts ({chosen.primitive}"
            f" {chosen.roles} vs {u.primitive} {u.roles}). {hint}")
  roles = chosen.roles
  if sorted(roles) != list(range(ndim)):
    raise ValueError(f"Cannot infer the role of every axis of {path!r}: "
                     f"got {roles}. {hint}")
  pick = lambda r: tuple(a for a in range(ndim) if roles[a] == r)
  return Layout(pick("batch"), pick("inputs"), pick("outputs"))
