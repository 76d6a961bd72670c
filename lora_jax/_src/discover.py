"""Layout discovery: how an apply function consumes each kernel.

``analyze`` traces the function abstractly (``jax.make_jaxpr``: no FLOPs)
and follows every kernel through the program: through views that keep its
data (``transpose``, ``reshape``, ``convert_element_type``, slicing a stacked
axis, ...) and into sub-programs (``jit``, ``scan``, ``remat``, ``cond``,
``while``, ``custom_jvp``/``custom_vjp``, ``shard_map``), up to the op that
consumes it: a ``dot_general``, a ``conv_general_dilated``, a
``ragged_dot_general`` or a row ``gather``. Those ops say which kernel axes
are contracted (inputs), kept (outputs) or batched.

It also follows what each matmul *produces*, to tell a hidden layer (its
result reaches another matmul) from an output layer such as an LM head or a
classifier (its result reaches the function's output with no further
matmul): ``targets="all-linear"`` adapts the former only, as PEFT does.

Everything about equation parameters is read through ``jaxpr_core``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

from lora_jax._src import jaxpr_core as jc
from lora_jax._src import walk
from lora_jax._src.dtypes import is_float_matrix
from lora_jax._src.layouts import Layout

_EMPTY: frozenset = frozenset()


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


@dataclasses.dataclass
class Analysis:
  """What :func:`analyze` found for the selected leaves (indexed like them).

  Attributes:
    uses: per leaf, its consumers.
    hidden: leaves consumed as the weight of a matmul / conv whose result
      reaches a further matmul (not an output layer, not a lookup table).
  """
  uses: list[list[Use]]
  hidden: set[int]


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
  axes: list[frozenset] = [frozenset()] * len(new)
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


class _Walker(walk.Walker):
  """Walks a program tracking kernel views (``_Tracked``) and, per value,
  which kernels' matmul results reached it with no matmul since (taint).
  A value is the pair ``(tracked or None, taint)``."""

  def __init__(self, num_leaves: int):
    self.uses: list[list[Use]] = [[] for _ in range(num_leaves)]
    self.weights: set[int] = set()  # consumed as a matmul / conv weight
    self.hidden: set[int] = set()   # ... whose result feeds another matmul

  def use(self, t: _Tracked, prim: str, role_of_axis: dict[int, str] | None,
          batch_axes: frozenset = _EMPTY):
    roles = None if role_of_axis is None else _roles(t, role_of_axis)
    if roles is not None:
      for k in batch_axes:
        if roles.get(k, "batch") != "batch":
          roles = None
          break
        roles[k] = "batch"
    self.uses[t.leaf].append(Use(prim, roles))
    return roles is not None

  def empty(self):
    return (None, _EMPTY)

  def run(self, program_or_jaxpr, tracked_in: Sequence[_Tracked | None],
          taint_in: Sequence[frozenset]):
    """Walks a program; returns tracked values and taints of its outputs."""
    jaxpr = getattr(program_or_jaxpr, "jaxpr", program_or_jaxpr)
    outs, _ = self.walk(jaxpr, list(zip(tracked_in, taint_in)))
    return [t for t, _ in outs], [s for _, s in outs]

  def first_order(self, frame, i, eqn, ins):
    del frame, i
    outs, taint = self.eqn(eqn, [t for t, _ in ins], [s for _, s in ins])
    return list(zip(outs, taint))

  def _pairs(self, tracked: list, taint: list) -> list:
    return list(zip(tracked, taint))

  def scan(self, frame, i, eqn, sub, ins):
    del frame, i
    return self._pairs(*self.higher_order(
        eqn, sub, [t for t, _ in ins], [s for _, s in ins]))

  cond = while_ = scan

  # -- one equation ---------------------------------------------------------

  def eqn(self, eqn, ins, in_taint):
    """A first-order equation: tracked outputs and taints."""
    n_out = len(eqn.outvars)
    prim = eqn.primitive
    union = _EMPTY.union(*in_taint)
    if prim in jc.DOT or prim in jc.CONV or prim in jc.RAGGED_DOT:
      return [None] * n_out, [self.matmul(eqn, ins, in_taint)] * n_out
    if not any(t is not None for t in ins):
      return [None] * n_out, [union] * n_out
    t = next(t for t in ins if t is not None)
    if prim in jc.GATHER and ins[0] is t:
      self.gather(eqn, t)
      return [None], [_EMPTY]
    view = self.view(eqn, ins, t)
    if view is not None:
      return view, [union] * n_out
    for x in ins:
      if x is not None:
        self.use(x, prim.name, None)
    return [None] * n_out, [union] * n_out

  def view(self, eqn, ins, t):
    """Tracked outputs of a view of kernel value ``t``, or None."""
    prim = eqn.primitive
    if prim in jc.PASS or prim in jc.ON_KERNEL or prim in jc.ON_EVERY_PART or (
        prim in jc.CAST):
      return list(ins[:len(eqn.outvars)])
    if ins[0] is not t:
      return None
    if prim in jc.TRANSPOSE:
      perm = jc.transpose_perm(eqn)
      return [dataclasses.replace(t, axes=tuple(t.axes[i] for i in perm))]
    if prim in jc.RESHAPE or prim in jc.EXPAND_DIMS:
      return [_reshape(t, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]
    if prim in jc.SQUEEZE:
      dims = jc.squeeze_dims(eqn)
      dropped = t.dropped.union(*(t.axes[d] for d in dims))
      return [_Tracked(t.leaf, tuple(a for i, a in enumerate(t.axes)
                                     if i not in dims), dropped)]
    if prim in jc.BROADCAST:
      axes = [frozenset()] * len(eqn.outvars[0].aval.shape)
      for k, d in enumerate(jc.broadcast_dims(eqn)):
        axes[d] = t.axes[k]
      return [_Tracked(t.leaf, tuple(axes), t.dropped)]
    if prim in jc.SLICE or prim in jc.DYNAMIC_SLICE:
      # A part of a stacked kernel (one layer, one expert) or of a fused one
      # (q of a fused qkv): the consumer says what each axis is.
      return [t]
    return None

  def matmul(self, eqn, ins, in_taint) -> frozenset:
    """Records the kernel use(s) of a dot / conv / ragged dot; returns the
    taint of its result."""
    prim = eqn.primitive
    kernels = []
    if prim in jc.DOT:
      dims = jc.dot_dims(eqn)
      for side, t in enumerate(ins):
        if t is None:
          continue
        _, contract, _, batch = dims.side(kernel_is_lhs=side == 0)
        role = {a: "outputs" for a in range(len(t.axes))}
        role.update({a: "inputs" for a in contract})
        role.update({a: "batch" for a in batch})
        kernels.append((side, self.use(t, "dot_general", role), t))
    elif prim in jc.CONV:
      if ins[0] is not None:
        self.use(ins[0], "conv_general_dilated (kernel as lhs)", None)
      if ins[1] is not None:
        spec = jc.conv_dims(eqn).rhs_spec
        role = {a: "inputs" for a in spec[1:]}
        role[spec[0]] = "outputs"
        kernels.append((1, self.use(ins[1], "conv_general_dilated", role),
                        ins[1]))
    else:  # ragged dot: the rhs (g, k, n) is a stack of kernels
      rd = jc.ragged_dims(eqn)
      if ins[0] is not None:
        self.use(ins[0], "ragged_dot_general (kernel as lhs)", None)
      t = ins[1]
      if t is not None:
        role = {a: "outputs" for a in range(len(t.axes))}
        role.update({a: "inputs" for a in rd.rhs_contract})
        role.update({a: "batch" for a in rd.rhs_batch + rd.rhs_group})
        kernels.append((1, self.use(t, "ragged_dot_general", role), t))
    weight_sides = {side for side, ok, _ in kernels}
    for side, taint in enumerate(in_taint[:2]):
      if side not in weight_sides:
        self.hidden |= taint  # an activation operand: its producers feed this
    resolved = [t.leaf for _, ok, t in kernels if ok]
    self.weights.update(resolved)
    if kernels:
      return frozenset(resolved)
    return _EMPTY

  def gather(self, eqn, t):
    g = jc.gather_dims(eqn)
    shape = eqn.invars[0].aval.shape
    role = {}
    for a in range(len(shape)):
      if a in g.operand_batching_dims:
        role[a] = "batch"
      elif a in g.start_index_map:
        role[a] = "inputs"
      elif g.slice_sizes[a] == shape[a]:
        role[a] = "outputs"
      else:
        role = None
        break
    if role is not None and "inputs" not in role.values():
      role = None
    self.use(t, "gather", role)

  # -- sub-programs -------------------------------------------------------

  def higher_order(self, eqn, sub, ins, in_taint):
    """A scan, cond or while (calls and shard_map: :meth:`walk.Walker.call`)."""
    n_out = len(eqn.outvars)
    if isinstance(sub, jc.Cond):
      outs_taint = [_EMPTY] * n_out
      for branch in sub.branches:
        _, taint = self.run(branch, ins[1:], in_taint[1:])
        outs_taint = [a | b for a, b in zip(outs_taint, taint)]
      return [None] * n_out, outs_taint
    if isinstance(sub, jc.Scan):
      nc, ncarry = sub.num_consts, sub.num_carry
      body_in = list(ins[:nc])
      for t in ins[nc:nc + ncarry]:
        if t is not None:
          self.use(t, "scan (kernel in the carry)", None)
        body_in.append(None)
      for t in ins[nc + ncarry:]:
        body_in.append(None if t is None else _Tracked(
            t.leaf, t.axes[1:], t.dropped | t.axes[0]))
      return self._loop(sub.body, body_in, list(in_taint), nc, ncarry,
                        n_out)
    if isinstance(sub, jc.While):
      cn, bn = sub.cond_nconsts, sub.body_nconsts
      carry = ins[cn + bn:]
      for t in carry:
        if t is not None:
          self.use(t, "while (kernel in the carry)", None)
      none = [None] * len(carry)
      self.run(sub.cond, list(ins[:cn]) + none,
               list(in_taint[:cn]) + list(in_taint[cn + bn:]))
      return self._loop(sub.body, list(ins[cn:cn + bn]) + none,
                        list(in_taint[cn:]), bn, len(carry), n_out)
    raise AssertionError(sub)

  def _loop(self, body, body_in, taint_in, nc, ncarry, n_out):
    """Runs a loop body until the carry's taint stops growing."""
    outer = list(taint_in)
    # each carry slot can gain each tracked leaf once: the lattice's height
    _, outs, _ = self.loop(
        body.jaxpr,
        lambda carry: list(zip(body_in, [*outer[:nc], *carry,
                                         *outer[nc + ncarry:]])),
        outer[nc:nc + ncarry],
        lambda carry, out: [a | s for a, (_, s) in zip(carry, out)],
        ncarry * len(self.uses), "a loop carry's taint (all-linear discovery)")
    return [None] * n_out, [s for _, s in outs][:n_out]


def analyze(apply_fn: Callable, params: Any, example_args: Sequence[Any],
            example_kwargs: dict | None, leaf_indices: Sequence[int]
            ) -> Analysis:
  """How ``apply_fn(params, *example_args)`` uses selected leaves of
  ``params`` (given by their index in ``tree_leaves`` order)."""
  closed, _, _ = jc.trace(apply_fn, params, tuple(example_args),
                          dict(example_kwargs or {}))
  jaxpr = closed.jaxpr
  tracked: list[_Tracked | None] = [None] * len(jaxpr.invars)
  for n, i in enumerate(leaf_indices):
    ndim = len(jaxpr.invars[i].aval.shape)
    tracked[i] = _Tracked(n, tuple(frozenset({k}) for k in range(ndim)))
  walker = _Walker(len(leaf_indices))
  try:
    _, out_taint = walker.run(jc.Program(jaxpr, tuple(closed.consts)),
                              tracked, [_EMPTY] * len(jaxpr.invars))
  except jc.UnknownSchemaError as e:
    raise jc.UnknownSchemaError(
        f"{e} Layout discovery cannot follow the kernels through it: give "
        f"their layouts explicitly, LoraConfig(layouts={{path_regex: "
        f"lora_jax.Layout(batch=..., inputs=..., outputs=...)}}).") from None
  return Analysis(walker.uses, walker.weights & walker.hidden)


def trace_uses(apply_fn: Callable, params: Any, example_args: Sequence[Any],
               example_kwargs: dict | None, leaf_indices: Sequence[int]
               ) -> list[list[Use]]:
  """The consumers of selected leaves of ``params`` in ``apply_fn``."""
  return analyze(apply_fn, params, example_args, example_kwargs,
                 leaf_indices).uses


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
        f"apply function (JAX {jc.JAX_VERSION}) it is consumed by {what}, "
        f"which does not say which axes are inputs and outputs. {hint}")
  gathers = [u for u in resolved if u.primitive == "gather"]
  chosen = (gathers or resolved)[0]
  if not gathers:
    for u in resolved[1:]:
      if u.roles != chosen.roles:
        raise ValueError(
            f"{path!r} is consumed with conflicting layouts ({chosen.primitive}"
            f" {chosen.roles} vs {u.primitive} {u.roles}). {hint}")
  roles: Any = chosen.roles  # not None: resolved uses only
  if sorted(roles) != list(range(ndim)):
    raise ValueError(f"Cannot infer the role of every axis of {path!r}: "
                     f"got {roles}. {hint}")
  pick = lambda r: tuple(a for a in range(ndim) if roles[a] == r)
  try:
    return Layout(pick("batch"), pick("inputs"), pick("outputs"))
  except ValueError as e:
    raise ValueError(f"The traced use of {path!r} gives no valid layout: {e} "
                     f"{hint}") from None


def linear_weights(apply_fn: Callable, params: Any, example_args,
                   example_kwargs, candidates: Sequence[tuple[int, str, Any]]
                   ) -> list[tuple[int, str, Any]]:
  """What ``targets="all-linear"`` selects with an apply function: among
  ``candidates`` (``(leaf index, path, leaf)``), every float leaf with at
  least 2 axes consumed as the weight of a matmul, einsum or conv whose
  result reaches a further matmul, whatever its name. Embedding lookups and
  output layers (an LM head, a classifier: their result reaches the output
  with no further matmul) are left out, as PEFT's ``all-linear`` does."""
  floats = [(i, p, x) for i, p, x in candidates if is_float_matrix(x)]
  found = analyze(apply_fn, params, example_args, example_kwargs,
                  [i for i, _, _ in floats])
  return [floats[n] for n in sorted(found.hidden)]
