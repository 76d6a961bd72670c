"""LoraDelta: the low-rank update of one kernel, as a pytree node."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.layouts import Layout
from lora_jax.paths import leaves_with_paths


def _describe(x: Any) -> str:
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
  where the groups of axes are given by ``layout``. ``a`` and ``b`` are the
  pytree children (what optimisers and checkpoints see); ``scale`` and
  ``layout`` are static metadata.

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

  def tree_flatten_with_keys(self):
    children = ((jax.tree_util.GetAttrKey("a"), self.a),
                (jax.tree_util.GetAttrKey("b"), self.b))
    return children, (self.scale, self.layout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # Skip __init__ checks: transformations rebuild nodes with placeholder
    # children (tracers, None, sentinels) that are not arrays.
    obj = object.__new__(cls)
    object.__setattr__(obj, "a", children[0])
    object.__setattr__(obj, "b", children[1])
    object.__setattr__(obj, "scale", aux[0])
    object.__setattr__(obj, "layout", aux[1])
    return obj

  def replace(self, **changes) -> "LoraDelta":
    """A copy with some fields replaced (``a``, ``b``, ``scale``, ``layout``)."""
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
    return math.prod(self.a.shape) + math.prod(self.b.shape)

  def __repr__(self) -> str:
    try:
      head = f"rank={self.rank}, kernel={self.kernel_shape}, "
    except Exception:  # pylint: disable=broad-except  # placeholder children
      head = ""
    return (f"LoraDelta({head}a={_describe(self.a)}, b={_describe(self.b)}, "
            f"scale={self.scale:g})")

  def weight(self) -> jax.Array:
    """The full-size update ``scale * a @ b`` in the kernel's own layout."""
    return delta_weight(self)


def delta_weight(delta: LoraDelta, dtype: Any = None) -> jax.Array:
  """Materialises ``scale * a @ b`` in the kernel's axis order.

  The product is taken as one batched 2-D matmul (flattening the input and
  output groups), then reshaped and transposed back to the kernel's layout.
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


def is_delta_or_none(x: Any) -> bool:
  """``is_leaf`` for walking delta trees: stops at adapters and empty slots."""
  return x is None or isinstance(x, LoraDelta)


def deltas_by_path(delta_tree: Any) -> dict[str, LoraDelta]:
  """``{path: LoraDelta}`` for every adapter in a delta tree."""
  return {p: d for p, d in leaves_with_paths(delta_tree, is_leaf=is_delta_or_none)
          if isinstance(d, LoraDelta)}
