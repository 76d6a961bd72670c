"""What lora_jax knows about JAX's program vocabulary, in one place.

Layout discovery (``discover.py``) and the factored engine (``factored/``)
read traced programs; this module is the only one that looks at
``eqn.params`` or at which primitive an equation binds. It answers three
questions about an equation:

* is it a *view* of its operand (the same data re-laid out: ``transpose``,
  ``reshape``, ``convert_element_type``, slicing a stacked axis, ...)?
* does it *consume* a kernel (``dot_general``, ``conv_general_dilated``,
  ``gather``, ``ragged_dot_general``)?
* is it a *higher-order* primitive, and if so how do its operands split
  between its sub-programs (:func:`higher_order`)?

JAX changes these parameters between releases (``scan``'s ``num_consts`` /
``num_carry`` became ``ft_in`` / ``ft_out`` in 0.11; ``jit``'s ``jaxpr``
went from ``ClosedJaxpr`` to ``Jaxpr``; ``custom_vjp_call_jaxpr`` became
``custom_vjp_call``; ``shard_map``'s ``in_names`` became ``in_specs``). Each
schema is read here, once, and every version in the supported range is
tested (``tests/test_jaxpr_core.py``). Rules are keyed by the primitive
objects that ``jax.extend.core.primitives`` exposes, and by name only where
JAX exposes no object (``pjit`` on old JAX, ``shard_map``, ``pvary``, ...).

Only public API: ``jax.make_jaxpr``, ``jax.extend.core``, ``jax.lax``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import functools
import math
from typing import Any

import jax
from jax.extend import core as jex
from jax.extend.core import primitives as _prims
import numpy as np

JAX_VERSION = jax.__version__


def constrain(x: Any, sharding: Any) -> Any:
  """``jax.lax.with_sharding_constraint(x, sharding)`` where the engine may
  place a value inside its own custom_jvp rules: JAX before 0.7 (0.6.2
  here) gives the constrained value a type its JVP check does not match
  with the tangent's ("Expected float32[4,2] ... but got float32[4,2]"), so
  there the value is left unconstrained (a placement hint only: GSPMD
  chooses, the numbers are the same)."""
  if tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 7):
    return x
  return jax.lax.with_sharding_constraint(x, sharding)


class UnknownSchemaError(RuntimeError):
  """An equation whose parameters this lora_jax does not know how to read."""


def schema_error(eqn, what: str) -> UnknownSchemaError:
  return UnknownSchemaError(
      f"lora_jax cannot read the parameters of {eqn.primitive.name!r} in JAX "
      f"{JAX_VERSION} ({what}; parameters: {sorted(eqn.params)}). Please "
      f"report this with your JAX version.")


def reads_params(reader: Callable) -> Callable:
  """Marks ``reader(eqn, ...)`` as a reader of ``eqn.params``: a parameter
  this JAX names or shapes differently (a missing key or attribute, a value
  of another form) becomes an :class:`UnknownSchemaError` naming the
  equation, never a bare ``KeyError`` that a caller could mistake for its
  own."""
  @functools.wraps(reader)
  def read(eqn, *args, **kwargs):
    try:
      return reader(eqn, *args, **kwargs)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      raise schema_error(
          eqn, f"{reader.__name__}: {type(e).__name__}: {e}") from None
  return read


# ---- matching primitives ------------------------------------------------------

class Primitives:
  """A set of primitives, matched by object where ``jax.extend`` exposes one
  and by name otherwise (and for names that older JAX used)."""

  def __init__(self, *objects: str, names: Sequence[str] = ()):
    self.objects = frozenset(
        getattr(_prims, o) for o in objects if hasattr(_prims, o))
    self.names = frozenset(names) | frozenset(
        o[:-2] for o in objects if not hasattr(_prims, o))

  def __contains__(self, primitive) -> bool:
    return primitive in self.objects or primitive.name in self.names


class PrimitiveTable:
  """A table keyed by primitive, built from ``(Primitives, value)`` pairs:
  ``table.get(primitive)`` matches by object where ``jax.extend`` exposes
  one, else by name; where two entries claim a primitive the first wins."""

  def __init__(self, entries: Sequence[tuple[Primitives, Any]]):
    self._objects: dict = {}
    self._names: dict = {}
    for prims, value in entries:
      for o in prims.objects:
        self._objects.setdefault(o, value)
      for n in prims.names:
        self._names.setdefault(n, value)

  def get(self, primitive, default: Any = None) -> Any:
    if primitive in self._objects:
      return self._objects[primitive]
    return self._names.get(primitive.name, default)


# Views: the result holds the operand's data in the same axis order. The
# factored engine applies PASS as the identity to a kernel, ON_KERNEL to the
# frozen kernel alone (the factors stay as they are) and ON_EVERY_PART to the
# kernel and each factor alike.
PASS = Primitives("copy_p", "optimization_barrier_p",
                  names=("copy", "optimization_barrier"))
ON_KERNEL = Primitives("reduce_precision_p", "sharding_constraint_p",
                       "device_put_p", names=("mesh_cast", "reshard"))
ON_EVERY_PART = Primitives("stop_gradient_p", names=("pvary",))
CAST = Primitives("convert_element_type_p")
TRANSPOSE = Primitives("transpose_p")
RESHAPE = Primitives("reshape_p")
SQUEEZE = Primitives("squeeze_p")
EXPAND_DIMS = Primitives(names=("expand_dims",))
BROADCAST = Primitives("broadcast_in_dim_p")
SLICE = Primitives("slice_p")
DYNAMIC_SLICE = Primitives("dynamic_slice_p")
# Elementwise maths (same-shape operands, scalars or literals beside them):
# what the factored engine may recompute in the backward pass instead of
# keeping its result (factored/recompute.py).
ELEMENTWISE = Primitives(*(f"{n}_p" for n in (
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "exp",
    "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt",
    "cbrt", "integer_pow", "pow", "square", "erf", "erfc", "erf_inv", "sin",
    "cos", "select_n", "convert_element_type", "gt", "ge", "lt", "le", "eq",
    "ne", "and", "or", "not", "is_finite", "copy")), names=("square",))
# Reductions over ``axes``, scans along ``axis``, concatenation along
# ``dimension`` (the row-axis analysis of mixed-adapter batches reads them).
REDUCE = Primitives(*(f"{n}_p" for n in (
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
    "reduce_or", "argmax", "argmin")))
CUMULATIVE = Primitives("cumsum_p", "cumprod_p", "cummax_p", "cummin_p",
                        "cumlogsumexp_p")
CONCATENATE = Primitives("concatenate_p")
SPLIT = Primitives("split_p", names=("split",))  # jax >= 0.4.36
# Consumers of a kernel.
DOT = Primitives("dot_general_p")
CONV = Primitives("conv_general_dilated_p")
GATHER = Primitives("gather_p")
RAGGED_DOT = Primitives("ragged_dot_general_p", names=("ragged_dot_general",))


# ---- reading consumer parameters --------------------------------------------

@dataclasses.dataclass(frozen=True)
class DotDims:
  """``dot_general``'s dimension numbers."""
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]

  def side(self, kernel_is_lhs: bool):
    """``(x_contract, k_contract, x_batch, k_batch)`` with the kernel on the
    given side."""
    if kernel_is_lhs:
      return (self.rhs_contract, self.lhs_contract, self.rhs_batch,
              self.lhs_batch)
    return self.lhs_contract, self.rhs_contract, self.lhs_batch, self.rhs_batch


@reads_params
def dot_dims(eqn) -> DotDims:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return DotDims(tuple(lc), tuple(rc), tuple(lb), tuple(rb))


@dataclasses.dataclass(frozen=True)
class ConvDims:
  rhs_spec: tuple[int, ...]   # (out feature axis, in feature axis, *spatial)
  out_feature_axis: int       # axis of the result holding the features
  groups: int                 # feature_group_count * batch_group_count


@reads_params
def conv_dims(eqn) -> ConvDims:
  dn = eqn.params["dimension_numbers"]
  return ConvDims(tuple(dn.rhs_spec), dn.out_spec[1],
                  eqn.params["feature_group_count"]
                  * eqn.params["batch_group_count"])


@dataclasses.dataclass(frozen=True)
class ConvParams:
  """What a convolution with other kernels needs (the factored engine's
  ``x * a`` with ``a`` as an r-feature conv kernel)."""
  window_strides: Any
  padding: Any
  lhs_dilation: Any
  rhs_dilation: Any
  dimension_numbers: Any
  precision: Any


@reads_params
def conv_params(eqn) -> ConvParams:
  p = eqn.params
  return ConvParams(p["window_strides"], p["padding"], p["lhs_dilation"],
                    p["rhs_dilation"], p["dimension_numbers"], p["precision"])


@dataclasses.dataclass(frozen=True)
class GatherDims:
  offset_dims: tuple[int, ...]
  collapsed_slice_dims: tuple[int, ...]
  start_index_map: tuple[int, ...]
  operand_batching_dims: tuple[int, ...]
  slice_sizes: tuple[int, ...]


@reads_params
def gather_dims(eqn) -> GatherDims:
  dn = eqn.params["dimension_numbers"]
  return GatherDims(tuple(dn.offset_dims), tuple(dn.collapsed_slice_dims),
                    tuple(dn.start_index_map),
                    tuple(getattr(dn, "operand_batching_dims", ())),
                    tuple(eqn.params["slice_sizes"]))


def gather_with_slice_sizes(eqn, operand, indices, slice_sizes):
  """The equation's gather applied to another operand (other slice sizes),
  in the equation's context (:func:`context`)."""
  params = dict(eqn.params)
  params["slice_sizes"] = tuple(slice_sizes)
  with context(eqn):
    return eqn.primitive.bind(operand, indices, **params)


@dataclasses.dataclass(frozen=True)
class RaggedDims:
  """``ragged_dot_general`` in the form ``jax.lax.ragged_dot`` emits: lhs
  ``(m, k)`` ragged along m, rhs ``(g, k, n)`` with a group axis."""
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  lhs_ragged: tuple[int, ...]
  rhs_group: tuple[int, ...]


@reads_params
def ragged_dims(eqn) -> RaggedDims:
  rd = eqn.params["ragged_dot_dimension_numbers"]
  (lc, rc), (lb, rb) = rd.dot_dimension_numbers
  return RaggedDims(tuple(lc), tuple(rc), tuple(lb), tuple(rb),
                    tuple(rd.lhs_ragged_dimensions),
                    tuple(rd.rhs_group_dimensions))


@reads_params
def slice_params(eqn):
  """``(start, limit, strides)`` of a ``slice``."""
  p = eqn.params
  strides = p["strides"] or (1,) * len(p["start_indices"])
  return tuple(p["start_indices"]), tuple(p["limit_indices"]), tuple(strides)


@reads_params
def transpose_perm(eqn) -> tuple[int, ...]:
  return tuple(eqn.params["permutation"])


@reads_params
def squeeze_dims(eqn) -> tuple[int, ...]:
  nd = len(eqn.invars[0].aval.shape)
  return tuple(sorted(d % nd for d in eqn.params["dimensions"]))


@reads_params
def broadcast_dims(eqn) -> tuple[int, ...]:
  return tuple(eqn.params["broadcast_dimensions"])


@reads_params
def reduce_axes(eqn) -> tuple[int, ...]:
  return tuple(eqn.params["axes"])


@reads_params
def cumulative_axis(eqn) -> int:
  return int(eqn.params["axis"])


@reads_params
def concatenate_dim(eqn) -> int:
  return int(eqn.params["dimension"])


@reads_params
def split_axis(eqn) -> int:
  return int(eqn.params["axis"])


@reads_params
def dynamic_slice_sizes(eqn) -> tuple[int, ...]:
  return tuple(eqn.params["slice_sizes"])


# ---- higher-order primitives --------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Program:
  """A sub-program and the values of its constvars."""
  jaxpr: jex.Jaxpr
  consts: tuple = ()


def _program(value, eqn) -> Program:
  if isinstance(value, jex.ClosedJaxpr):
    return Program(value.jaxpr, tuple(value.consts))
  if isinstance(value, jex.Jaxpr):
    if value.constvars:
      raise schema_error(eqn, "an open Jaxpr with constvars")
    return Program(value)
  raise schema_error(eqn, f"a sub-program of type {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Call:
  """Operands map one to one onto ``body``'s inputs (jit, closed_call,
  custom_jvp / custom_vjp primal)."""
  body: Program
  kind: str


@dataclasses.dataclass(frozen=True)
class Scan:
  """Operands are ``consts + carry + xs``; results ``carry + ys``."""
  body: Program
  num_consts: int
  num_carry: int
  length: int
  reverse: bool
  unroll: Any


@dataclasses.dataclass(frozen=True)
class While:
  """Operands are ``cond_consts + body_consts + carry``; results ``carry``."""
  cond: Program
  body: Program
  cond_nconsts: int
  body_nconsts: int


@dataclasses.dataclass(frozen=True)
class Cond:
  """Operands are ``index, *ops``; each branch takes ``ops``."""
  branches: tuple[Program, ...]


@dataclasses.dataclass(frozen=True)
class Remat:
  body: Program
  prevent_cse: bool
  policy: Any


@dataclasses.dataclass(frozen=True)
class ShardMap:
  """``shard_map``: each operand enters ``body`` split by ``in_specs``."""
  body: Program
  mesh: Any
  in_specs: tuple
  out_specs: tuple
  check: bool
  axis_names: frozenset

  def emit(self, fn: Callable) -> Callable:
    """``fn`` (taking and returning flat lists) as a ``shard_map`` with this
    one's mesh and checks, for operands of ``in_specs`` (possibly others
    than the equation's)."""
    return lambda in_specs, out_specs: _emit_shard_map(
        fn, self, tuple(in_specs), tuple(out_specs))


def _emit_shard_map(fn, sm: ShardMap, in_specs, out_specs):
  def flat(*args):
    return tuple(fn(list(args)))
  mesh_axes = frozenset(sm.mesh.axis_names)
  public = getattr(jax, "shard_map", None)
  if public is not None:
    kwargs = {}
    if sm.axis_names != mesh_axes:
      kwargs["axis_names"] = set(sm.axis_names)
    return public(flat, mesh=sm.mesh, in_specs=in_specs,
                  out_specs=out_specs, check_vma=sm.check, **kwargs)
  from jax.experimental.shard_map import shard_map
  return shard_map(flat, mesh=sm.mesh, in_specs=in_specs,
                   out_specs=out_specs, check_rep=sm.check,
                   auto=mesh_axes - sm.axis_names)  # type: ignore[call-arg]  # jax < 0.7


def _names_to_spec(names: dict, ndim: int):
  """Old ``shard_map``'s ``{axis: (mesh axes...)}`` as a ``PartitionSpec``."""
  entries = []
  for d in range(ndim):
    axes = tuple(names.get(d, ()))
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.sharding.PartitionSpec(*entries)


# Higher-order primitives: :func:`higher_order` reads each one's structure.
SCAN = Primitives("scan_p")
WHILE = Primitives("while_p")
COND = Primitives("cond_p")
REMAT = Primitives("remat_p", names=("checkpoint", "remat2"))
CALL = Primitives("jit_p", "closed_call_p", names=("pjit", "core_call"))
CUSTOM_JVP = Primitives("custom_jvp_call_p")
CUSTOM_VJP = Primitives("custom_vjp_call_p", "custom_vjp_call_jaxpr_p")
SHARD_MAP = Primitives(names=("shard_map",))


def _part_sizes(flat_tree) -> list[int]:
  """Number of values in each part of scan's ``ft_in`` (a tuple of flat
  trees: consts, carry, xs). Iterating or indexing the object walks its flat
  values, so its parts come from ``unpack()``."""
  parts = flat_tree.unpack() if hasattr(flat_tree, "unpack") else flat_tree
  return [len(p) for p in parts]


def _scan(eqn) -> Scan:
  p = eqn.params
  if "num_consts" in p:  # jax < 0.11
    nc, ncarry = p["num_consts"], p["num_carry"]
  elif "ft_in" in p:     # jax >= 0.11: flat trees of (consts, carry, xs)
    sizes = _part_sizes(p["ft_in"])
    if len(sizes) != 3 or sum(sizes) != len(eqn.invars):
      raise schema_error(eqn, "ft_in does not split into consts, carry, xs")
    nc, ncarry = sizes[0], sizes[1]
  else:
    raise schema_error(eqn, "no num_consts/num_carry or ft_in")
  return Scan(_program(p["jaxpr"], eqn), nc, ncarry, p["length"],
              p["reverse"], p.get("unroll", 1))


def _shard_map(eqn) -> ShardMap:
  p = eqn.params
  mesh = p["mesh"]
  if "in_specs" in p:
    in_specs, out_specs = tuple(p["in_specs"]), tuple(p["out_specs"])
  elif "in_names" in p:
    in_specs = tuple(_names_to_spec(n, len(v.aval.shape))
                     for n, v in zip(p["in_names"], eqn.invars))
    out_specs = tuple(_names_to_spec(n, len(v.aval.shape))
                      for n, v in zip(p["out_names"], eqn.outvars))
  else:
    raise schema_error(eqn, "no in_specs or in_names")
  check = p.get("check_vma", p.get("check_rep", True))
  if "newly_manual_axes" in p:
    axis_names = frozenset(p["newly_manual_axes"])
  elif "axis_names" in p:
    axis_names = frozenset(p["axis_names"])
  else:
    axis_names = frozenset(mesh.axis_names) - frozenset(p.get("auto", ()))
  return ShardMap(_program(p["jaxpr"], eqn), mesh, in_specs, out_specs,
                  bool(check), axis_names)


def _call_body(eqn, *keys) -> Program:
  for k in keys:
    if k in eqn.params:
      return _program(eqn.params[k], eqn)
  raise schema_error(eqn, f"none of {keys}")


def higher_order(eqn):
  """The structure of a higher-order equation, or None for a first-order one.

  Returns a :class:`Call`, :class:`Scan`, :class:`While`, :class:`Cond`,
  :class:`Remat` or :class:`ShardMap`. Raises :class:`UnknownSchemaError`
  for a known primitive whose parameters this version cannot read.
  """
  prim = eqn.primitive
  try:
    if prim in SCAN:
      return _scan(eqn)
    if prim in CALL:
      return Call(_call_body(eqn, "jaxpr", "call_jaxpr"), "call")
    if prim in REMAT:
      p = eqn.params
      return Remat(_call_body(eqn, "jaxpr"), p["prevent_cse"], p["policy"])
    if prim in COND:
      return Cond(tuple(_program(b, eqn) for b in eqn.params["branches"]))
    if prim in WHILE:
      p = eqn.params
      return While(_program(p["cond_jaxpr"], eqn),
                   _program(p["body_jaxpr"], eqn), p["cond_nconsts"],
                   p["body_nconsts"])
    if prim in CUSTOM_JVP:
      return Call(_call_body(eqn, "call_jaxpr"), "custom_jvp")
    if prim in CUSTOM_VJP:
      return Call(_call_body(eqn, "call_jaxpr", "fun_jaxpr"), "custom_vjp")
    if prim in SHARD_MAP:
      return _shard_map(eqn)
  except KeyError as e:
    raise schema_error(eqn, f"missing parameter {e}") from None
  return None


def programs_of(structure) -> tuple[Program, ...]:
  """Every sub-program of a :func:`higher_order` structure (None: none)."""
  if structure is None:
    return ()
  if isinstance(structure, While):
    return (structure.cond, structure.body)
  if isinstance(structure, Cond):
    return structure.branches
  return (structure.body,)


def holds(jaxpr, primitives: Primitives) -> bool:
  """Whether ``jaxpr`` or any sub-program of it has an equation of
  ``primitives``."""
  return any(eqn.primitive in primitives
             or any(holds(p.jaxpr, primitives)
                    for p in programs_of(higher_order(eqn)))
             for eqn in jaxpr.eqns)


# ---- tracing and evaluating ---------------------------------------------------

def is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct))


def trace(fn: Callable, params: Any, args: tuple, kwargs: dict):
  """``jax.make_jaxpr`` of ``fn(params, *args, **kwargs)``.

  Array leaves of ``args``/``kwargs`` become inputs; every other leaf (Python
  bools such as ``deterministic=True``, strings, ...) stays static, as it would
  be under ``jit`` with static arguments. Returns ``(closed_jaxpr, inputs,
  out_tree)`` where ``inputs`` are the flat values for the jaxpr's invars
  (params' leaves first, in ``tree_leaves`` order).
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(leaves) if is_array(x)]

  def flat_fn(p, dyn):
    full = list(leaves)
    for i, x in zip(dynamic, dyn):
      full[i] = x
    a, k = jax.tree.unflatten(treedef, full)
    return fn(p, *a, **k)
  dyn = [leaves[i] for i in dynamic]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(params, dyn)
  inputs = jax.tree.leaves(params) + dyn
  return closed, inputs, jax.tree.structure(out_shape)


def bind(eqn, invals: Sequence[Any]) -> list:
  """Evaluates one equation on concrete values or tracers; returns a list."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  invals = list(invals)
  if isinstance(bind_params, tuple):  # (subfuns, params)
    subfuns, bind_params = bind_params
    invals = [*subfuns, *invals]
  with context(eqn):
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def bind_into(eqns: Sequence[Any], env: dict) -> None:
  """Evaluates ``eqns`` in order, reading operands from and writing results
  (dropped outputs aside) to ``env``."""
  for e in eqns:
    for v, x in zip(e.outvars, bind(e, [read(env, v) for v in e.invars])):
      if not is_dropvar(v):
        env[v] = x


def context(eqn):
  """The context the equation was traced in (its abstract mesh: inside an
  ``auto_axes`` region, as ``.at[ids].get(out_sharding=...)`` makes, the
  mesh's axes are Auto): what code standing in for the equation runs
  under; a no-op context where the equation records none."""
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  return ctx if ctx is not None else contextlib.nullcontext()


def read(env: dict, v) -> Any:
  """The value of a jaxpr atom: a literal's value or ``env[var]``."""
  return v.val if isinstance(v, jex.Literal) else env[v]


def is_literal(v) -> bool:
  return isinstance(v, jex.Literal)


def is_dropvar(v) -> bool:
  """An output nobody reads (``_`` in a printed jaxpr). ``jax.extend.core``
  exports ``DropVar`` from JAX 0.7 on; before that only its name tells."""
  drop = getattr(jex, "DropVar", None)
  return isinstance(v, drop) if drop is not None else (
      type(v).__name__ == "DropVar")


# ---- structural keys ------------------------------------------------------------

class NoKey(Exception):
  """A value with no structural key (unhashable, or data that is not a
  parameter): whatever it belongs to is not shared."""


def value_key(v: Any) -> Any:
  """A hashable stand-in for ``v`` that is equal only for values that act
  alike: Python scalars by type and ``repr`` (``0.0`` and ``-0.0`` differ,
  so do ``1``, ``1.0`` and ``True``), NumPy values by dtype, shape and
  bytes, containers element by element, anything else hashable as itself
  (its own equality: a jaxpr or function is equal only to itself). Raises
  :class:`NoKey` for the rest (a jax.Array, an unhashable object)."""
  if v is None or isinstance(v, (bool, int, float, complex, str)):
    return (type(v).__name__, repr(v))
  if isinstance(v, (tuple, list)):
    return (type(v).__name__, tuple(value_key(x) for x in v))
  if isinstance(v, dict):
    return ("dict", tuple(sorted((repr(k), value_key(x))
                                 for k, x in v.items())))
  if isinstance(v, (np.ndarray, np.generic)):
    a = np.asarray(v)
    return ("ndarray", a.dtype.str, a.shape, a.tobytes())
  if isinstance(v, jax.Array):  # tracers included
    raise NoKey(f"an array ({type(v).__name__})")
  try:
    hash(v)
  except TypeError:
    raise NoKey(f"unhashable {type(v).__name__}") from None
  return ("object", type(v), v)


def aval_key(x: Any) -> Any:
  """Shape, dtype, weak type and (Explicit axes) sharding type of a value
  or variable."""
  aval = getattr(x, "aval", None)
  if aval is None:
    aval = jax.typeof(x)
  return (tuple(aval.shape), str(aval.dtype),
          bool(getattr(aval, "weak_type", False)), type_spec(aval))


def equations_key(eqns: Sequence[Any], inputs: Sequence[Any]) -> Any:
  """A key equal for two equation lists that compute alike from inputs of
  the same types: each equation's primitive, parameters
  (:func:`value_key`), tracing context and operands, each operand a
  literal's value or the position of the input or earlier output it reads.
  Raises :class:`NoKey` where that cannot be said (an operand from outside,
  a parameter without a key)."""
  where: dict = {v: i for i, v in enumerate(inputs)}
  out = [tuple(aval_key(v) for v in inputs)]
  for e in eqns:
    refs = []
    for v in e.invars:
      if is_literal(v):
        refs.append(("literal", value_key(np.asarray(v.val)),
                     aval_key(v)))
      elif v in where:
        refs.append(where[v])
      else:
        raise NoKey(f"{e.primitive.name} reads a value from outside")
    out.append((e.primitive, _params_key(e), _context_key(e), tuple(refs),
        tuple(aval_key(v) for v in e.outvars)))
    for v in e.outvars:
      where[v] = len(where)
  return tuple(out)


def _context_key(eqn) -> Any:
  """The equation's tracing context (abstract mesh, compute type, ...) by
  its fields where it names them in ``__slots__`` (JAX 0.6's compares by
  identity, and each equation may hold its own); else as itself."""
  ctx = getattr(eqn, "ctx", None)
  slots = [s for t in type(ctx).__mro__
           for s in _names(getattr(t, "__slots__", ()))
           if not s.startswith("__")]
  if ctx is None or not slots:
    return value_key(ctx)
  return (type(ctx), tuple((s, value_key(getattr(ctx, s, None)))
                           for s in slots))


def _names(slots) -> tuple:
  return (slots,) if isinstance(slots, str) else tuple(slots)


@reads_params
def _params_key(eqn) -> Any:
  return tuple(sorted((k, value_key(v)) for k, v in eqn.params.items()))


# ---- sharding in types (meshes with AxisType.Explicit axes) -------------------
# Under a mesh whose axes are Explicit (jax.make_mesh's default since JAX 0.9),
# every array's type carries its sharding, and a product whose contracted axes
# are sharded needs an explicit out_sharding. The engine's own products read
# their operands' types here and pass one; on Auto and Manual axes (and where
# nothing is sharded by type) these helpers are the plain ops.

def _explicit_axes(mesh) -> frozenset:
  types = getattr(mesh, "axis_types", None) or ()
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  return frozenset(n for n, t in zip(getattr(mesh, "axis_names", ()), types)
                   if explicit is not None and t == explicit)


def type_spec(x) -> tuple | None:
  """The PartitionSpec entries of ``x``'s type, one per axis, when that type
  names Explicit mesh axes (sharding in types); None otherwise."""
  typeof = getattr(jax, "typeof", None)
  if typeof is None or not hasattr(x, "shape"):
    return None
  # an equation's aval is its own type; a value's type is jax.typeof's
  aval = typeof(x) if isinstance(x, (jax.Array, np.ndarray, np.generic)) else x
  sharding = getattr(aval, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not _explicit_axes(mesh):
    return None
  spec = tuple(sharding.spec)  # type: ignore[union-attr]  # has a mesh
  return spec + (None,) * (len(x.shape) - len(spec))


def _axes_of(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def dot(x, y, dimension_numbers, precision=None, preferred_element_type=None):
  """``lax.dot_general`` whose result, under Explicit axes, is sharded as
  dot_general lays it out: batch axes as ``x``'s, then ``x``'s free axes as
  ``x``'s, then ``y``'s free axes as ``y``'s (a mesh axis used twice keeps
  its first use); contracted axes sharded on both sides are summed across
  the mesh. Without Explicit axes, ``lax.dot_general`` itself."""
  sx, sy = type_spec(x), type_spec(y)
  kw = {"precision": precision, "preferred_element_type": preferred_element_type}
  if sx is None and sy is None:
    return jax.lax.dot_general(x, y, dimension_numbers, **kw)
  sx = sx or (None,) * x.ndim
  sy = sy or (None,) * y.ndim
  (xc, yc), (xb, yb) = dimension_numbers
  # batch axes must be sharded alike: y (the small factor) follows x
  if any(sx[i] != sy[j] for i, j in zip(xb, yb)):
    new = list(sy)
    for i, j in zip(xb, yb):
      new[j] = sx[i]
    taken = [a for j, e in enumerate(new) if j not in yb for a in _axes_of(e)]
    for j in yb:
      if any(a in taken for a in _axes_of(new[j])):
        new[j] = None
    y, sy = _reshard(y, new), tuple(new)
  x_free = [d for d in range(x.ndim) if d not in xc and d not in xb]
  y_free = [d for d in range(y.ndim) if d not in yc and d not in yb]
  used: set = set()
  out = []
  for entry in ([sx[d] for d in xb] + [sx[d] for d in x_free]
                + [sy[d] for d in y_free]):
    axes = _axes_of(entry)
    if any(a in used for a in axes):
      entry = None
    else:
      used.update(axes)
    out.append(entry)
  return jax.lax.dot_general(x, y, dimension_numbers, **kw,
                             out_sharding=jax.sharding.PartitionSpec(*out))


def matmul(x, y):
  """``x @ y`` for 2-D operands through :func:`dot`."""
  return dot(x, y, (((1,), (0,)), ((), ())))


def reshard_like(x, aval):
  """``x`` resharded to ``aval``'s type where that names Explicit axes (the
  base program's own product, so the user's ``out_sharding`` choices
  survive); ``x`` itself otherwise."""
  spec = type_spec(aval)
  if spec is None or type_spec(x) == spec:
    return x
  return _reshard(x, spec)


def reshard_to(x, spec):
  """``x`` resharded to the type ``spec`` (one entry per axis) under
  Explicit mesh axes; ``x`` itself where its type already says so."""
  return x if type_spec(x) in (None, tuple(spec)) else _reshard(x, spec)


_SHARDING_CONSTRAINT = Primitives("sharding_constraint_p")


@reads_params
def constraint_sharding(eqn):
  """The ``NamedSharding`` a ``with_sharding_constraint`` equation puts its
  operand on; None for any other equation or sharding."""
  if eqn.primitive not in _SHARDING_CONSTRAINT:
    return None
  sharding = eqn.params["sharding"]
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _reshard(x, spec):
  reshard = getattr(jax.sharding, "reshard", None)
  if reshard is None:  # jax < 0.7
    from jax.experimental.shard import reshard
  return reshard(x, jax.sharding.PartitionSpec(*spec))


def align(v, x, axes: dict):
  """``v`` resharded so that its axis ``j`` is sharded as ``x``'s axis
  ``i`` for each ``{j: i}`` in ``axes`` (a per-row value beside the rows it
  scales), under Explicit mesh axes; ``v`` itself otherwise."""
  sx = type_spec(x)
  if sx is None:
    return v
  sv = list(type_spec(v) or (None,) * v.ndim)
  want = list(sv)
  for j, i in axes.items():
    want[j] = sx[i]
  return v if want == sv else _reshard(v, want)


def _reshape_spec(shape_in, spec, shape_out) -> tuple | None:
  """The spec a reshape keeps: dims are grouped where their products agree;
  a group's sharding goes to its leading (major) output dim, which must
  divide by it; None where a sharded dim cannot be carried so."""
  out: list = [None] * len(shape_out)
  i = j = 0
  while i < len(shape_in) or j < len(shape_out):
    gi, gj = [i], [j]
    pi = shape_in[i] if i < len(shape_in) else 1
    pj = shape_out[j] if j < len(shape_out) else 1
    while pi != pj:
      if pi < pj:
        i += 1
        gi.append(i)
        pi *= shape_in[i]
      else:
        j += 1
        gj.append(j)
        pj *= shape_out[j]
    sharded = [d for d in gi if d < len(spec) and spec[d] is not None]
    if sharded:
      major_in = [d for d in gi if shape_in[d] > 1]
      major_out = [d for d in gj if d < len(shape_out) and shape_out[d] > 1]
      if sharded != major_in[:1] or not major_out:
        return None
      out[major_out[0]] = spec[sharded[0]]
    i, j = i + 1, j + 1
  return tuple(out)


def reshape(x, shape):
  """``x.reshape(shape)``; under Explicit axes with the sharding carried to
  each group's major dim (merged or split), as ``reshape`` needs it said."""
  shape = tuple(int(d) for d in shape)
  if -1 in shape:
    known = math.prod(d for d in shape if d != -1)
    shape = tuple(x.size // known if d == -1 and known else d for d in shape)
  spec = type_spec(x)
  if (spec is None or not any(spec) or tuple(x.shape) == shape
      or 0 in shape or 0 in x.shape):
    return x.reshape(shape)
  out = _reshape_spec(tuple(x.shape), spec, shape)
  if out is None:
    return x.reshape(shape)  # JAX's own error names the reshape
  return jax.lax.reshape(x, shape,
                         out_sharding=jax.sharding.PartitionSpec(*out))


def abstract_like(x, shape=None, dtype=None) -> jax.ShapeDtypeStruct:
  """``x``'s shape and dtype (or the ones given), and under Explicit mesh
  axes ``x``'s sharding type too: what ``linear_transpose`` of a program on
  ``x`` must be given, or a stand-in for a value sharded as ``x``."""
  shape = x.shape if shape is None else shape
  dtype = x.dtype if dtype is None else dtype
  if type_spec(x) is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.typeof(x).sharding)
