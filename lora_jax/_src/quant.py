"""Quantized frozen kernels (QLoRA): blockwise-absmax NF4 and int8 storage.

A :class:`QArray` stands for one float kernel. Its values are cut into blocks
of ``block_size`` consecutive entries along the kernel's contracted (input)
axis; each block keeps its absolute maximum (float32) and one code per entry:

* ``"nf4"``: the index (0..15) of the NF4 value nearest to ``x / absmax``,
  two codes per byte;
* ``"int8"``: ``round(127 * x / absmax)``, one signed byte per entry.

In float32 these are evaluated as ``x * (1 / absmax)`` and ``x * (127 /
absmax)`` (one division per block), rounding half to even.

Dequantizing is a table lookup (nf4) or a cast (int8) and one multiply per
entry, cheap enough to do inside the jitted step at the point of use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.config import ALL_LINEAR
from lora_jax._src.config import PatternMap
from lora_jax._src.config import check_regex_matches
from lora_jax._src.config import selector_patterns
from lora_jax._src.config import selects
from lora_jax._src.delta import adapters
from lora_jax._src.delta import describe_array
from lora_jax._src.delta import is_concrete
from lora_jax._src.delta import pytree_node
from lora_jax._src.discover import layout_from_uses
from lora_jax._src.discover import linear_weights
from lora_jax._src.discover import trace_uses
from lora_jax._src.dtypes import is_float
from lora_jax._src.dtypes import is_float_matrix
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.sharding import unpack_sharding

SCHEMES = ("nf4", "int8")

# NF4 (Dettmers et al. 2023, "QLoRA", section 3): quantiles of N(0, 1) taken
# so that zero is exact, normalised to [-1, 1]. With delta = (1 - 1/30 + 1 -
# 1/32) / 2, the 8 positive values are Phi^-1(p) for p evenly spaced from
# delta down to 1/2 (9 points, the last one dropped), the 7 negative values
# are -Phi^-1(p) for 8 points from delta to 1/2 (last dropped), plus 0; all
# divided by the largest. These are bitsandbytes' float32 numbers (which the
# test rederives from that definition), so codes are interchangeable.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# x / absmax maps to code i when it lies above i midpoints (a value exactly on
# a midpoint goes to the lower code, as bitsandbytes' `x > threshold` does).
NF4_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / np.float32(2)

# Double quantization (QLoRA): the float32 absmax values, less their mean,
# are int8-quantized in blocks of this many (flattened, row-major).
DOUBLE_QUANT_BLOCK = 256
# Dequantizing int8 multiplies by this float32 constant (XLA would turn a
# division by 127 into this multiply anyway; written out, numpy agrees).
_INV_127 = np.float32(1 / 127)


@pytree_node(children=("codes", "absmax", "absmax_scale", "absmax_mean"),
             static=("scheme", "block_size", "shape", "dtype", "axis"))
@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
  """A quantized kernel: packed codes plus per-block float32 absmax.

  The children (``codes``, ``absmax``, ``absmax_scale``, ``absmax_mean``) are
  what ``jax.tree`` functions, jit, sharding and orbax see; the other fields
  are static metadata.

  Attributes:
    codes: ``uint8`` for nf4, two codes per byte packed along ``axis``
      (entry ``2j`` in the high nibble, ``2j + 1`` in the low one; the axis
      is half as long as the kernel's); ``int8`` for int8, one per entry.
      Other axes are the kernel's, so the codes shard like the kernel.
    absmax: per-block absolute maximum, the kernel's shape with ``axis``
      divided by ``block_size``; float32, or int8 codes with double quant.
    absmax_scale: double quant only (else None): float32 scale per block of
      256 absmax values.
    absmax_mean: double quant only (else None): their float32 mean;
      ``absmax = codes * (1 / 127) * scale + mean``.
    scheme: ``"nf4"`` or ``"int8"``.
    block_size: entries per block along ``axis``.
    shape: the shape of the kernel it stands for.
    dtype: the dtype of the kernel it stands for.
    axis: the contracted axis the blocks run along.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> q = lj.quantize({"w": jnp.ones((512, 512))}, "nf4")["w"]
  >>> q
  QArray(nf4, f32[512,512], block 64)
  >>> q.shape, q.dtype, q.nbytes == 512 * 512 // 2 + 4 * 512 * 512 // 64
  ((512, 512), dtype('float32'), True)
  """

  codes: Any
  absmax: Any
  absmax_scale: Any = None
  absmax_mean: Any = None
  scheme: str = "nf4"
  block_size: int = 64
  shape: tuple[int, ...] = ()
  dtype: Any = np.dtype(np.float32)
  axis: int = 0

  # paths.leaves_with_paths and map_with_paths treat the node as one leaf, so
  # a quantized kernel keeps its kernel's path.
  lora_jax_leaf = True

  def replace(self, **changes) -> QArray:
    """A copy with some fields replaced."""
    return dataclasses.replace(self, **changes)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    """Number of entries of the kernel it stands for."""
    return math.prod(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.absmax_scale is not None

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (codes, absmax and double-quant constants)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))

  @property
  def sharding(self) -> Any:
    """The kernel's sharding as read off the codes (``None`` if unplaced)."""
    s = getattr(self.codes, "sharding", None)
    if isinstance(self.codes, jax.core.Tracer) or not isinstance(
        s, NamedSharding):
      return None
    return s

  def dequantize(self) -> jax.Array:
    """The float kernel, of shape ``shape`` and dtype ``dtype``."""
    return dequantize_array(self)

  def block_absmax(self) -> jax.Array:
    """The float32 absmax of each block (undoing double quantization)."""
    return block_absmax(self)

  def scan_view(self) -> QArray:
    """This stacked kernel as ``lax.scan`` slices it: the metadata of one
    slice along axis 0, the children keeping that axis (scan slices them).

    For engines and models that scan over stacked layers: scanning over
    ``q.scan_view()`` hands each step a well-formed ``QArray`` of one layer.
    Double quantization is resolved first (its blocks of 256 absmax values
    span layers), so the view holds float32 absmax.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = jax.random.normal(jax.random.key(0), (3, 64, 8))
    >>> q = lj.quantize({"w": w}, "nf4", layouts={"w": lj.Layout((0,), (1,), (2,))})["w"]
    >>> _, layers = jax.lax.scan(lambda c, ql: (c, lj.dequantize(ql)), 0, q.scan_view())
    >>> bool((layers == lj.dequantize(q)).all())
    True
    """
    if self.axis == 0 or self.ndim < 3:
      raise ValueError(
          f"QArray.scan_view: {self!r} has its blocks along axis {self.axis}; "
          f"a stacked kernel to scan over needs a leading (batch) axis that "
          f"the blocks do not run along, and at least 3 axes.")
    return self.replace(absmax=self.block_absmax(), absmax_scale=None,
                        absmax_mean=None, shape=self.shape[1:],
                        axis=self.axis - 1)

  def shardings(self, kernel_sharding: Any) -> QArray:
    """A QArray of shardings for this one's children, derived from the
    sharding of the kernel it replaces (for ``jax.device_put``, ``jit``'s
    ``in_shardings``/``out_shardings`` or an orbax restore target).

    Codes and absmax keep the kernel's ``PartitionSpec``; given a
    ``NamedSharding``, an axis whose length the mesh axes do not divide (e.g.
    the absmax of few blocks) is replicated instead (a bare ``PartitionSpec``
    carries no mesh sizes and is kept as it is). The double-quant constants
    are replicated.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> q = lj.quantize({"w": jnp.ones((128, 8))}, "nf4")["w"]
    >>> q.shardings(P(None, "model")).codes == P(None, "model")
    True
    """
    spec, wrap, mesh = unpack_sharding(kernel_sharding, "QArray.shardings")
    entries = tuple(spec or ()) + (None,) * (self.ndim - len(spec or ()))

    def like_kernel(x):
      if x is None:
        return None
      kept = []
      for dim, entry in zip(x.shape, entries):
        names = entry if isinstance(entry, tuple) else (entry,)
        ways = 1 if mesh is None or entry is None else math.prod(
            mesh.shape[n] for n in names)
        kept.append(entry if dim % ways == 0 else None)
      return wrap(PartitionSpec(*kept))
    replicated = lambda x: None if x is None else wrap(PartitionSpec())
    return self.replace(
        codes=like_kernel(self.codes), absmax=like_kernel(self.absmax),
        absmax_scale=replicated(self.absmax_scale),
        absmax_mean=replicated(self.absmax_mean))

  def __repr__(self) -> str:
    extra = "" if self.axis == 0 else f", axis {self.axis}"
    if self.double_quant:
      extra += ", double quant"
    return (f"QArray({self.scheme}, {describe_array(self)}, block "
            f"{self.block_size}{extra})")


def _is_qarray(x: Any) -> bool:
  return isinstance(x, QArray)


def has_qarrays(tree: Any) -> bool:
  """Whether any leaf of ``tree`` is a :class:`QArray`."""
  return any(isinstance(x, QArray) for x in jax.tree.leaves(
      tree, is_leaf=_is_qarray))


# --- the arithmetic -------------------------------------------------------


def _split_axis(shape: Sequence[int], axis: int, parts: int) -> tuple:
  """``shape`` with ``axis`` split into ``(shape[axis] // parts, parts)``."""
  shape = tuple(shape)
  return shape[:axis] + (shape[axis] // parts, parts) + shape[axis + 1:]


def _nonzero(x: jax.Array) -> jax.Array:
  # An all-zero block has absmax 0; divide by 1 instead (codes for 0).
  return jnp.where(x > 0, x, jnp.ones_like(x))


# Both schemes scale by a per-block factor computed once (one division per
# block, as bitsandbytes), so every backend rounds the same way: XLA would
# otherwise rewrite a division by a broadcast absmax into such a multiply.


def _int8_codes(x: jax.Array, absmax: jax.Array, axis: int) -> jax.Array:
  """``round(x * (127 / absmax))`` (half to even), as int8."""
  factor = jnp.expand_dims(127 / _nonzero(absmax), axis)
  return jnp.round(x * factor).astype(jnp.int8)


def _nf4_codes(x: jax.Array, absmax: jax.Array, axis: int) -> jax.Array:
  """Index of the nearest NF4 value to ``x * (1 / absmax)``, as uint8."""
  normed = x * jnp.expand_dims(1 / _nonzero(absmax), axis)
  # 15 compares fuse into one elementwise pass (no gather, no sort).
  codes = jnp.zeros(normed.shape, jnp.uint8)
  for mid in NF4_MIDPOINTS:
    codes = codes + (normed > mid).astype(jnp.uint8)
  return codes


def _double_quantize(absmax: jax.Array):
  """int8 codes of ``absmax - mean`` in blocks of 256, per-block scales, mean."""
  flat = absmax.reshape(-1)
  n = flat.shape[0]
  blocks = -(-n // DOUBLE_QUANT_BLOCK)
  mean = jnp.mean(flat)
  centered = jnp.pad(flat - mean, (0, blocks * DOUBLE_QUANT_BLOCK - n))
  centered = centered.reshape(blocks, DOUBLE_QUANT_BLOCK)
  scale = jnp.max(jnp.abs(centered), axis=1)
  codes = _int8_codes(centered, scale, 1).reshape(-1)[:n]
  return codes.reshape(absmax.shape), scale, mean


def _quantize_array(x: jax.Array, scheme: str, block_size: int, axis: int,
                    double_quant: bool) -> QArray:
  shape = tuple(x.shape)
  blocks = x.astype(jnp.float32).reshape(_split_axis(shape, axis, block_size))
  absmax = jnp.max(jnp.abs(blocks), axis=axis + 1)
  # A block holding NaN or +-inf dequantizes to NaN throughout (an inf absmax
  # would turn +inf into -inf in nf4 and finite entries into NaN or 0).
  absmax = jnp.where(jnp.isfinite(absmax), absmax, jnp.nan)
  if scheme == "int8":
    codes = _int8_codes(blocks, absmax, axis + 1).reshape(shape)
  else:
    pairs = _nf4_codes(blocks, absmax, axis + 1).reshape(
        _split_axis(shape, axis, 2))
    high = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    low = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
    codes = (high << 4) | low
  scale = mean = None
  if double_quant:
    absmax, scale, mean = _double_quantize(absmax)
  return QArray(codes, absmax, scale, mean, scheme=scheme,
                block_size=block_size, shape=shape, dtype=np.dtype(x.dtype),
                axis=axis)


def block_absmax(q: QArray) -> jax.Array:
  """The float32 per-block absmax of ``q`` (undoing double quantization)."""
  if not q.double_quant:
    return q.absmax
  n = math.prod(q.absmax.shape)
  scale = jnp.repeat(q.absmax_scale, DOUBLE_QUANT_BLOCK)[:n]
  return (q.absmax.astype(jnp.float32) * _INV_127 * scale.reshape(
      q.absmax.shape) + q.absmax_mean)


def dequantize_array(q: QArray) -> jax.Array:
  """The float kernel a :class:`QArray` stands for (traceable, no jit)."""
  axis = q.axis
  if q.scheme == "int8":
    values = q.codes.astype(jnp.float32)
    step = block_absmax(q) * _INV_127  # int8: code * (absmax * (1 / 127))
  else:
    pairs = jnp.stack([q.codes >> 4, q.codes & 15], axis=axis + 1)
    values = _nf4_values(jc.reshape(pairs, q.shape))
    step = block_absmax(q)
  blocks = jc.reshape(values, _split_axis(q.shape, axis, q.block_size))
  out = blocks * jnp.expand_dims(step, axis + 1)
  return jc.reshape(out, q.shape).astype(q.dtype)


def _nf4_values(codes: jax.Array) -> jax.Array:
  """NF4 codes (0..15) to their float32 values: a table lookup, or under
  Explicit mesh axes, where a gather from a replicated table by sharded
  codes has no sharding rule, the same values by elementwise selects."""
  if jc.type_spec(codes) is None:
    return jnp.asarray(NF4_VALUES)[codes]
  # where's operands keep the codes' sharding type: start from the codes
  values = jnp.where(codes == 0, jnp.float32(NF4_VALUES[0]), jnp.float32(0))
  for k in range(1, len(NF4_VALUES)):
    values = jnp.where(codes == k, jnp.float32(NF4_VALUES[k]), values)
  return values


# --- the tree-level API -----------------------------------------------------


def dequantize(tree: Any) -> Any:
  """``tree`` with every :class:`QArray` replaced by its float kernel.

  Works on a single ``QArray`` too. Traceable: inside ``jit`` the lookup and
  multiply fuse with what consumes the kernel. Other leaves are returned as
  they are.

  Args:
    tree: a pytree (e.g. a base from :func:`quantize`) or one ``QArray``.

  Returns:
    The same structure with float arrays (each of its ``QArray``'s ``dtype``
    and ``shape``) in place of the ``QArray`` leaves.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> w = jnp.array([[0.5, -1.0], [1.0, 0.25]])
  >>> q = lj.quantize({"w": w}, "int8", block_size=2)
  >>> print(jnp.round(lj.dequantize(q)["w"], 3))  # 64/127 * 1.0, 32/127 * 1.0
  [[ 0.504 -1.   ]
   [ 1.     0.252]]
  """
  return jax.tree.map(
      lambda x: dequantize_array(x) if isinstance(x, QArray) else x, tree,
      is_leaf=_is_qarray)


def _divisors_near(n: int, want: int, even: bool) -> list[int]:
  sizes = [d for d in range(2 if even else 1, n + 1) if n % d == 0
           and (d % 2 == 0 or not even)]
  return sorted(sorted(sizes, key=lambda d: (abs(math.log(d / want)), d))[:4])


def _layout_for(path: str, layouts: PatternMap,
                from_delta: Mapping[str, Layout]) -> Layout | None:
  found = layouts.lookup(path)
  return from_delta.get(path) if found is None else found


def _block_axis(path: str, x: Any, layout: Layout | None) -> int:
  """The contracted axis the blocks of leaf ``path`` run along."""
  shape = tuple(x.shape)
  if layout is not None:
    if layout.ndim != len(shape):
      raise ValueError(
          f"quantize: the layout given for {path!r} has {layout.ndim} axes "
          f"but the leaf has shape {shape}.")
    # Several input axes (conv: spatial and features; DenseGeneral: heads
    # and head dim): the blocks run along the innermost one.
    return max(layout.inputs)
  if len(shape) == 2:
    return 0  # Flax's (in, out)
  raise ValueError(
      f"quantize: cannot tell which axis of {path!r} (shape {shape}) is "
      f"contracted; only 2-D kernels default to (in, out), blocks along axis "
      f"0. Pass quantize(..., delta=delta) with the delta from lora_jax.split "
      f"(it knows each adapter's layout), or layouts={{{path!r}: "
      f"lora_jax.Layout(batch=..., inputs=..., outputs=...)}}, or leave the "
      f"leaf out of targets.")


def _check_leaf(path: str, x: Any, scheme: str, block_size: int,
                axis: int) -> None:
  length = x.shape[axis]
  if length % block_size:
    sizes = _divisors_near(length, block_size, scheme == "nf4")
    hint = (f"Block sizes that divide it: {', '.join(map(str, sizes))}."
            if sizes else "No even block size divides it.")
    raise ValueError(
        f"quantize: block_size {block_size} does not divide the length "
        f"{length} of axis {axis} of {path!r} (shape {tuple(x.shape)}), the "
        f"contracted axis the blocks run along. {hint} Or leave the leaf out "
        f"of targets.")


def _targeted(path: str, x: Any, targets: Any) -> bool:
  if targets is None:
    return not isinstance(x, QArray) and is_float_matrix(x)
  return selects(targets, path, x)


def _check_target(path: str, x: Any) -> None:
  if isinstance(x, QArray):
    raise ValueError(
        f"quantize: {path!r} is already quantized ({x!r}). To change its "
        f"scheme or block size, quantize lora_jax.dequantize(tree) instead, "
        f"or leave it out of targets.")
  if not is_float(x):
    dtype = getattr(x, "dtype", None)
    raise TypeError(
        f"quantize: {path!r} is not a floating-point array (dtype {dtype}); "
        f"only float kernels can be quantized. Narrow `targets`.")
  if len(x.shape) < 2:
    raise ValueError(
        f"quantize: {path!r} has shape {tuple(x.shape)}; quantize stores "
        f"kernels (2 or more axes) blockwise along their contracted axis. "
        f"Narrow `targets`.")


def _check_finite(path: str, x: Any, q: QArray) -> None:
  """Raises if concrete kernel ``x`` holds NaN or +-inf (read off ``q``'s
  absmax: a block's absmax is non-finite iff the block holds such a value)."""
  flag = q.absmax_mean if q.double_quant else q.absmax
  if not is_concrete(flag) or bool(jnp.isfinite(flag).all()):
    return
  bad = ~jnp.isfinite(x)
  first = np.unravel_index(int(jnp.argmax(bad.reshape(-1))), x.shape)
  raise ValueError(
      f"quantize: {path!r} (shape {tuple(x.shape)}) holds {int(bad.sum())} "
      f"non-finite values (NaN or +-inf), the first at index "
      f"{tuple(int(i) for i in first)}; a block's absmax would be "
      f"non-finite and the whole block would dequantize to NaN. Fix those "
      f"weights (e.g. jnp.nan_to_num) or leave the leaf out of targets.")


def _quantize_leaf(path: str, x: Any, scheme: str, block_size: int,
                   axis: int, double_quant: bool) -> QArray:
  """Quantizes one kernel; a concrete sharded one keeps its placement."""
  args = (scheme, block_size, axis, double_quant)
  if not is_concrete(x):
    return _quantize_array(x, *args)  # traced: the caller's jit places it
  fn = lambda w: _quantize_array(w, *args)
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    out = jax.eval_shape(fn, x).shardings(sharding)
    q = jax.jit(fn, out_shardings=out)(x)
  else:
    q = _QUANTIZE_JIT(x, *args)
  _check_finite(path, x, q)
  return q


_QUANTIZE_JIT = jax.jit(_quantize_array, static_argnums=(1, 2, 3, 4))


def _block_size(block_size: Any, scheme: str) -> int:
  if isinstance(block_size, (bool, np.bool_)) or not isinstance(
      block_size, (int, np.integer)):
    raise TypeError(
        f"quantize: block_size must be a positive int (Python or NumPy "
        f"integer), got {block_size!r} of type {type(block_size).__name__}.")
  if block_size < 1 or (scheme == "nf4" and block_size % 2):
    raise ValueError(
        f"quantize: block_size must be a positive integer (even for nf4, two "
        f"codes per byte), got {int(block_size)}.")
  return int(block_size)


def _delta_layouts(tree: Any) -> dict[str, Layout] | None:
  """``{path: layout}`` of the adapters (and stacks) of ``tree`` if it is a
  delta tree, None if it is a selector."""
  if tree is None or isinstance(tree, str) or callable(tree) or (
      isinstance(tree, (list, tuple)) and all(isinstance(t, str)
                                              for t in tree)):
    return None
  from lora_jax._src.stack import stacks
  found = {p: d.layout for p, d in adapters(tree).items()}
  found.update({p: s.layout for p, s in stacks(tree).items()})
  return found


def _stand_ins(tree: Any) -> Any:
  """``tree`` with shape stand-ins for its ``QArray`` leaves, to trace."""
  if not has_qarrays(tree):
    return tree
  return map_with_paths(lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype)
                        if isinstance(x, QArray) else x, tree)


def _traced_layout(path: str, x: Any, uses: list) -> Layout:
  try:
    return layout_from_uses(path, len(x.shape), uses)
  except ValueError as e:
    raise ValueError(
        f"quantize: {e} (For quantize: layouts={{{path!r}: lora_jax.Layout("
        f"...)}}.)") from None


def quantize(tree: Any, scheme: str = "nf4", block_size: int = 64,
             targets: str | Sequence[str] | Callable[[str, Any], bool] |
             Any = None, double_quant: bool = False,
             layouts: Mapping[str, Layout] | None = None,
             delta: Any = None, apply_fn: Callable | None = None,
             example_args: Sequence[Any] = (),
             example_kwargs: dict | None = None) -> Any:
  """Replaces kernels of ``tree`` by :class:`QArray` leaves (QLoRA's frozen base).

  Each targeted kernel is cut into blocks of ``block_size`` entries along its
  contracted (input) axis; each block stores its float32 absmax and, per
  entry, the NF4 code nearest to ``x / absmax`` (``"nf4"``, 4 bits) or
  ``round(127 * x / absmax)`` (``"int8"``). The axis comes from ``layouts``,
  else from ``delta``'s adapters (so ``quantize(base, "nf4", delta=delta)``
  after :func:`lora_jax.split` knows every adapted kernel's layout), else is
  axis 0 of a 2-D leaf (Flax's ``(in, out)``); any other leaf is an error.
  With ``apply_fn`` the axis of every targeted kernel that ``layouts`` and
  ``delta`` leave open is read off an abstract trace, as
  :func:`lora_jax.split` does. Concrete kernels sharded with a
  ``NamedSharding`` give ``QArray`` leaves whose codes and absmax are sharded
  alike (see :meth:`QArray.shardings`).

  Which kernels: ``targets=delta`` (the delta of :func:`lora_jax.split`, or a
  stack) quantizes exactly the kernels it adapts, in their layouts;
  ``targets="all-linear"`` with ``apply_fn`` and ``example_args`` exactly
  what ``LoraConfig(targets="all-linear")`` adapts through ``split`` with
  the same function (every matmul / einsum weight whose result feeds a
  further matmul, whatever its name; not the embedding or the output head).

  Non-finite weights: a concrete kernel holding NaN or +-inf is a
  ``ValueError`` naming it (a block's absmax would be non-finite). Traced
  (under ``jit``), where nothing can be checked, every entry of a block that
  holds one dequantizes to NaN (with ``double_quant``, every entry of the
  kernel: the absmax are quantized together), never a finite value or an inf.

  Args:
    tree: a parameter pytree (a base from :func:`lora_jax.split`, or params).
    scheme: ``"nf4"`` or ``"int8"``.
    block_size: entries per block along the contracted axis: a positive
      int (a NumPy integer too; not a bool) that divides that axis (and is
      even for nf4).
    targets: which leaves to quantize: a regex full-matched on the
      '/'-joined path, a list of them, a callable ``(path, leaf) -> bool``,
      ``"all-linear"`` (needs ``apply_fn``), or a delta tree (its adapted
      kernels). ``None`` (default): every float leaf with 2 or more axes
      that is not already a ``QArray`` (embedding tables and output heads
      included).
    double_quant: also quantize the absmax values (QLoRA's double
      quantization): int8 in blocks of 256 after subtracting their mean.
    layouts: ``{path regex: lora_jax.Layout}`` for kernels not stored
      ``(in, out)``; the first regex that full-matches wins.
    delta: a delta from :func:`lora_jax.split`; its adapters' layouts say
      which axis of each adapted kernel is contracted.
    apply_fn: the model's function, called as ``apply_fn(tree,
      *example_args, **example_kwargs)`` on an abstract trace (no FLOPs),
      for ``"all-linear"`` and the layouts of kernels not given otherwise.
    example_args: positional example inputs of ``apply_fn``.
    example_kwargs: keyword example inputs of ``apply_fn``.

  Returns:
    ``tree`` with a ``QArray`` at every targeted leaf.

  Raises:
    TypeError: ``block_size`` is not an integer, a target is not a float
      array, or ``targets`` is of another type.
    ValueError: an unknown ``scheme``, a ``block_size`` below 1 (or odd for
      nf4), a targets regex that matches nothing, a target already quantized
      or with fewer than 2 axes, an axis ``block_size`` does not divide, a
      layout that cannot be told, or a concrete kernel holding NaN or inf;
      each names the leaf and the remedy.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (128, 64)),
  ...                  "bias": jnp.zeros(64)}}
  >>> qparams = lj.quantize(params, "nf4", block_size=64)
  >>> qparams["fc"]["kernel"]
  QArray(nf4, f32[128,64], block 64)
  >>> err = abs(lj.dequantize(qparams)["fc"]["kernel"] - params["fc"]["kernel"])
  >>> bool(err.max() < 0.15 * abs(params["fc"]["kernel"]).max())
  True
  """
  if scheme not in SCHEMES:
    raise ValueError(f"quantize: scheme must be one of {SCHEMES}, got "
                     f"{scheme!r}.")
  block_size = _block_size(block_size, scheme)
  leaves = leaves_with_paths(tree)
  index = {p: i for i, (p, _) in enumerate(leaves)}
  adapted = _delta_layouts(targets)
  all_linear = isinstance(targets, str) and targets == ALL_LINEAR
  if all_linear and apply_fn is None:
    raise ValueError(
        "quantize: targets='all-linear' needs apply_fn and example_args: it "
        "selects the kernels the model uses as matmul / einsum weights, "
        "whatever their names, read off a trace of the model (as "
        "lora_jax.split does). Pass quantize(tree, targets='all-linear', "
        "apply_fn=f, example_args=(x,)), targets=delta (the kernels a delta "
        "adapts), or a regex of the kernels' paths.")
  traced = _stand_ins(tree) if apply_fn is not None else None
  if adapted is not None:
    if not adapted:
      raise TypeError(
          f"quantize: targets must be a regex, a list of them, a callable "
          f"(path, leaf) -> bool, 'all-linear', or a delta tree holding "
          f"adapters; got {type(targets).__name__} with no LoraDelta in it.")
    missing = [p for p in adapted if p not in index]
    if missing:
      raise ValueError(
          f"quantize: targets is a delta adapting {preview(missing)}, which "
          f"the tree has no leaf at. Pass the base the delta was split from. "
          f"Some paths that exist: {preview(index)}.")
    selected = [(p, x) for p, x in leaves if p in adapted]
  elif all_linear:
    assert apply_fn is not None  # "all-linear" without it was refused above
    found = linear_weights(apply_fn, traced, example_args, example_kwargs,
                           [(i, p, x) for i, (p, x) in enumerate(leaves)
                            if not isinstance(x, QArray)])
    selected = [(p, x) for _, p, x in found]
  else:
    for pattern in selector_patterns(targets):
      check_regex_matches(pattern, [p for p, _ in leaves], "quantize: targets")
    selected = [(p, x) for p, x in leaves if _targeted(p, x, targets)]
  pattern_layouts = PatternMap(tuple((layouts or {}).items()))
  from_delta = dict(adapted or {})
  if delta is not None:
    from_delta.update((p, d.layout) for p, d in adapters(delta).items())
  given = {}
  for path, x in selected:
    _check_target(path, x)
    given[path] = _layout_for(path, pattern_layouts, from_delta)
  need_trace = [p for p, layout in given.items()
                if layout is None and apply_fn is not None]
  if need_trace:
    assert apply_fn is not None  # need_trace is empty without it
    uses = trace_uses(apply_fn, traced, example_args, example_kwargs,
                      [index[p] for p in need_trace])
    for p, u in zip(need_trace, uses, strict=True):
      given[p] = _traced_layout(p, leaves[index[p]][1], u)
  plan = {}
  for path, x in selected:
    axis = _block_axis(path, x, given[path])
    _check_leaf(path, x, scheme, block_size, axis)
    plan[path] = axis
  if not plan:
    raise ValueError(
        f"quantize: no leaf selected (targets={targets!r}). Some paths that "
        f"exist: {preview(p for p, _ in leaves)}.")
  return map_with_paths(
      lambda p, x: _quantize_leaf(p, x, scheme, block_size, plan[p],
                                  double_quant)
      if p in plan else x, tree)
