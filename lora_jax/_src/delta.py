"""LoraDelta: the low-rank update of one kernel, as a pytree node."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths


def describe_array(x: Any) -> str:
  """``f32[4,2]``: dtype and shape, without the values."""
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None:
    return repr(x)
  name = getattr(dtype, "name", str(dtype))
  short = {"float32": "f32", "float64": "f64", "bfloat16": "bf16",
           "float16": "f16"}.get(name, name)
  return f"{short}[{','.join(str(d) for d in shape)}]"


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class LoraDelta:
  """Low-rank update ``scale * a @ b`` of one kernel.

  ``a`` has shape ``(*batch, *in, rank)`` and ``b`` ``(*batch, rank, *out)``
  where the groups of axes are given by ``layout``. With DoRA, ``magnitude``
  has shape ``(*batch, *out)``. ``a``, ``b`` and ``magnitude`` are the pytree
  children (what optimisers and checkpoints see); ``scale``, ``layout`` and
  ``dropout`` are static metadata.

  >>> import jax.numpy as jnp
  >>> d = LoraDelta(jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=0.5,
  ...               layout=Layout.dense())
  >>> d
  LoraDelta(rank=2, kernel=(4, 3), a=f32[4,2], b=f32[2,3], scale=0.5)
  >>> d.replace(scale=1.0).scale
  1.0
  """

  a: Any
  b: Any
  scale: float = 1.0
  layout: Layout = Layout.dense()
  magnitude: Any = None  # DoRA only: (*batch, *out)
  dropout: float = 0.0   # on the LoRA branch's input, when given a key

  def tree_flatten_with_keys(self):
    key = jax.tree_util.GetAttrKey
    children = ((key("a"), self.a), (key("b"), self.b),
                (key("magnitude"), self.magnitude))
    return children, (self.scale, self.layout, self.dropout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # Skip __init__ checks: transformations rebuild nodes with placeholder
    # children (tracers, None, sentinels) that are not arrays.
    obj = object.__new__(cls)
    for name, value in zip(("a", "b", "magnitude"), children):
      object.__setattr__(obj, name, value)
    for name, value in zip(("scale", "layout", "dropout"), aux):
      object.__setattr__(obj, name, value)
    return obj

  def replace(self, **changes) -> "LoraDelta":
    """A copy with some fields replaced."""
    return dataclasses.replace(self, **changes)

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the kernel this update applies to."""
    return self.layout.kernel_shape(self.a.shape, self.b.shape)

  @property
  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in (self.a, self.b, self.magnitude)
               if x is not None)

  def __repr__(self) -> str:
    try:
      head = f"rank={self.rank}, kernel={self.kernel_shape}, "
    except Exception:  # pylint: disable=broad-except  # placeholder children
      head = ""
    extra = "" if self.magnitude is None else (
        f", magnitude={describe_array(self.magnitude)}")
    if self.dropout:
      extra += f", dropout={self.dropout:g}"
    return (f"LoraDelta({head}a={describe_array(self.a)}, b={describe_array(self.b)}, "
            f"scale={self.scale:g}{extra})")

  def weight(self) -> jax.Array:
    """The full-size update ``scale * a @ b`` in the kernel's own layout."""
    return delta_weight(self)


def delta_weight(delta: LoraDelta, dtype: Any = None) -> jax.Array:
  """Materialises ``scale * a @ b`` in the kernel's axis order.

  The product is taken as one batched 2-D matmul (flattening the input and
  output groups), then reshaped and transposed back to the kernel's layout.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = lj.LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)), scale=0.5,
  ...                  layout=lj.Layout.transposed())   # kernel stored (2, 3)
  >>> lj.delta_weight(d)
  Array([[0.5, 0.5, 0.5],
         [0.5, 0.5, 0.5]], dtype=float32)
  """
  layout = delta.layout
  a, b = delta.a, delta.b
  nb = len(layout.batch)
  batch = a.shape[:nb]
  ins, outs = a.shape[nb:-1], b.shape[nb + 1:]
  r = a.shape[-1]
  a2 = a.reshape(math.prod(batch), math.prod(ins), r)
  b2 = b.reshape(math.prod(batch), r, math.prod(outs))
  w = jnp.einsum("gir,gro->gio", a2, b2,
                 precision=jax.lax.Precision.HIGHEST) * delta.scale
  w = w.reshape(*batch, *ins, *outs)
  order = layout.order
  perm = sorted(range(len(order)), key=lambda k: order[k])
  w = jnp.transpose(w, perm)
  return w if dtype is None else w.astype(dtype)


def _to_factor_order(w: jax.Array, layout: Layout) -> jax.Array:
  """A kernel as ``(batch, in, out)`` groups flattened: ``(B, K, N)``."""
  batch, ins, outs = layout.sizes(w.shape)
  return jnp.transpose(w, layout.order).reshape(
      math.prod(batch), math.prod(ins), math.prod(outs))


def dora_norm(w0: jax.Array, delta: LoraDelta, dtype: Any = None) -> jax.Array:
  """``||W0 + scale * a @ b||`` over the input axes, shape ``(*batch, *out)``.

  Computed in low rank, never forming ``a @ b``: per output unit,
  ``||w||^2 + 2 s <w, a b> + s^2 ||a b||^2`` with ``<w, a b> = sum_r (a^T w) b``
  and ``||a b||^2 = b^T (a^T a) b``.
  """
  lay = delta.layout
  dtype = dtype or jnp.result_type(w0.dtype, delta.a.dtype)
  batch, ins, outs = lay.sizes(w0.shape)
  g, k, n = math.prod(batch), math.prod(ins), math.prod(outs)
  w = _to_factor_order(w0, lay).astype(dtype)
  a = delta.a.reshape(g, k, -1).astype(dtype)
  b = delta.b.reshape(g, -1, n).astype(dtype)
  hi = jax.lax.Precision.HIGHEST
  s = delta.scale
  cross = jnp.einsum("gkr,gkn->grn", a, w, precision=hi)
  gram = jnp.einsum("gkr,gkq->grq", a, a, precision=hi)
  sq = (jnp.sum(w * w, axis=1) + 2 * s * jnp.sum(cross * b, axis=1)
        + s * s * jnp.sum(b * jnp.einsum("grq,gqn->grn", gram, b, precision=hi),
                          axis=1))
  return jnp.sqrt(jnp.maximum(sq, 0)).reshape(*batch, *outs)


def column_factor(values: jax.Array, layout: Layout, ndim: int) -> jax.Array:
  """A ``(*batch, *out)`` array laid out to broadcast against the kernel."""
  axes = layout.batch + layout.outputs
  order = sorted(range(len(axes)), key=lambda i: axes[i])
  v = jnp.transpose(values, order)
  shape = [1] * ndim
  for ax in sorted(axes):
    shape[ax] = v.shape[sorted(axes).index(ax)]
  return v.reshape(shape)


def adapted_weight(w0: jax.Array, delta: LoraDelta, sign: float = 1.0
                   ) -> jax.Array:
  """The kernel the adapter stands for, in the base's dtype.

  LoRA: ``W0 + s a b``. DoRA: ``m (W0 + s a b) / ||W0 + s a b||`` with the norm
  held constant for gradients. ``sign=-1`` undoes plain LoRA.
  """
  dtype = jnp.result_type(w0.dtype, delta.a.dtype, delta.b.dtype)
  v = w0.astype(dtype) + sign * delta_weight(delta, dtype)
  if delta.magnitude is not None:
    norm = jax.lax.stop_gradient(dora_norm(w0, delta, dtype))
    v = v * column_factor(delta.magnitude.astype(dtype) / norm, delta.layout,
                          w0.ndim)
  return v.astype(w0.dtype)


def is_delta_or_none(x: Any) -> bool:
  """``is_leaf`` for walking delta trees: stops at adapters and empty slots."""
  return x is None or isinstance(x, LoraDelta)


def adapters(delta_tree: Any) -> dict[str, LoraDelta]:
  """``{path: LoraDelta}`` for every adapter in a delta tree
  (``lora_jax.adapters``): the same for a delta from ``split`` (with ``None``
  slots, or NNX ``State``) and one from ``load``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> _, delta = lj.split({"a": {"kernel": jnp.ones((4, 4))}, "b": jnp.ones(4)},
  ...                     lj.LoraConfig(rank=2), jax.random.key(0))
  >>> list(lj.adapters(delta))
  ['a/kernel']
  """
  return {p: d for p, d in leaves_with_paths(delta_tree, is_leaf=is_delta_or_none)
          if isinstance(d, LoraDelta)}
