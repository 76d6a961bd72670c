"""LoraDelta: the low-rank update of one kernel, as a pytree node."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths


def is_concrete(x: Any) -> bool:
  """Whether ``x`` is a ``jax.Array`` holding values (not a tracer under
  ``jit`` / ``grad``, not a ``ShapeDtypeStruct``).

  >>> import jax, jax.numpy as jnp
  >>> is_concrete(jnp.ones(2)), is_concrete(jax.ShapeDtypeStruct((2,), "f4"))
  (True, False)
  """
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def describe_array(x: Any) -> str:
  """``f32[4,2]``: dtype and shape, without the values."""
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None:
    return repr(x)
  name = getattr(dtype, "name", str(dtype))
  short = {"float32": "f32", "float64": "f64", "bfloat16": "bf16",
           "float16": "f16"}.get(name, name)
  return f"{short}[{','.join(str(d) for d in shape)}]"


def rebuild_node(cls: type, names: tuple[str, ...], values: tuple) -> Any:
  """An instance of the frozen dataclass ``cls`` with ``names`` set to
  ``values``, bypassing ``__init__`` (for ``tree_unflatten``, whose children
  may be tracers, None or sentinels that ``__init__`` would reject)."""
  obj: Any = object.__new__(cls)
  for name, value in zip(names, values, strict=True):
    object.__setattr__(obj, name, value)
  return obj


def pytree_node(children: tuple[str, ...], static: tuple[str, ...]):
  """Registers a frozen dataclass as a pytree node, the one way lora_jax
  declares its nodes: the fields ``children`` are the node's children (data:
  what optimisers, checkpoints and transformations see, keyed by
  ``GetAttrKey``), the fields ``static`` its treedef's metadata (compared and
  hashed: a change retraces). Unflattening bypasses ``__init__`` (see
  :func:`rebuild_node`), which ``jax.tree_util.register_dataclass`` would
  call on placeholder children.

  >>> @pytree_node(children=("x",), static=("name",))
  ... @dataclasses.dataclass(frozen=True)
  ... class Node:
  ...   x: Any
  ...   name: str = "n"
  >>> jax.tree.map(lambda v: v + 1, Node(1, "k"))
  Node(x=2, name='k')
  """
  key = jax.tree_util.GetAttrKey
  names = children + static

  def register(cls: type) -> type:
    jax.tree_util.register_pytree_with_keys(
        cls,
        lambda obj: (tuple((key(n), getattr(obj, n)) for n in children),
                     tuple(getattr(obj, n) for n in static)),
        lambda aux, kids: rebuild_node(cls, names, (*kids, *aux)),
        lambda obj: (tuple(getattr(obj, n) for n in children),
                     tuple(getattr(obj, n) for n in static)))
    return cls
  return register


@pytree_node(children=("a", "b", "magnitude"),
             static=("scale", "layout", "dropout", "residual_of"))
@dataclasses.dataclass(frozen=True)
class LoraDelta:
  """Low-rank update ``scale * a @ b`` of one kernel.

  ``a``, ``b`` and ``magnitude`` are the pytree children (what optimisers and
  checkpoints see); ``scale``, ``layout``, ``dropout`` and ``residual_of`` are
  static metadata (the same in a delta and in its gradient).

  Attributes:
    a: shape ``(*batch, *in, rank)``, the groups of axes given by ``layout``.
    b: shape ``(*batch, rank, *out)``.
    scale: the update's factor (``alpha / rank``).
    layout: which kernel axes are batch, input and output axes.
    magnitude: DoRA only: shape ``(*batch, *out)``; else None.
    dropout: LoRA dropout on the branch's input (when given a key).
    residual_of: for an adapter made by a principal init (PiSSA / OLoRA),
      the mark of the residual base ``split`` returned, which it belongs
      with; else None.

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
  residual_of: ResidualMark | None = None  # principal inits only

  _DELTA_LEAF = True  # what is_delta_or_none stops at

  def replace(self, **changes) -> LoraDelta:
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
    except (AttributeError, TypeError, ValueError, IndexError):  # placeholder children
      head = ""
    extra = "" if self.magnitude is None else (
        f", magnitude={describe_array(self.magnitude)}")
    if self.dropout:
      extra += f", dropout={self.dropout:g}"
    if self.residual_of is not None:
      extra += f", init={self.residual_of.init}"
    return (f"LoraDelta({head}a={describe_array(self.a)}, b={describe_array(self.b)}, "
            f"scale={self.scale:g}{extra})")

  def weight(self, dtype: Any = None) -> jax.Array:
    """The full-size update ``scale * a @ b`` in the kernel's own layout."""
    return delta_weight(self, dtype)

  def check_base(self, path: str, w: Any, who: str = "The adapter") -> None:
    """Raises unless ``w`` can be the base this adapter was made for.

    Only a principal-init adapter (PiSSA / OLoRA) carries what is needed, and
    only a concrete ``w`` can be checked (under ``jit`` nothing is).

    Args:
      path: the leaf path, for the message.
      w: the base kernel the adapter is about to be merged into or applied to.
      who: the adapter, for the message (e.g. ``"Adapter 2 of the stack"``).

    Returns:
      None.
    """
    mark = self.residual_of
    if mark is None or not is_concrete(w):
      return
    n = kernel_norm(w)
    if abs(n - mark.original_norm) < abs(n - mark.residual_norm):
      raise ValueError(
          f"{who} at {path!r} was made with init={mark.init!r}: it "
          f"belongs with the residual base that lora_jax.split returned "
          f"(||W|| {mark.residual_norm:.6g}), but this base kernel looks like "
          f"the original weights (||W|| {n:.6g}, original "
          f"{mark.original_norm:.6g}). Use the residual base, or convert "
          f"the adapter with lora_jax.to_plain_lora(initial_delta, delta) to "
          f"apply it to the original weights.")


@dataclasses.dataclass(frozen=True)
class ResidualMark:
  """What a principal-init adapter records of its base: the init and the
  Frobenius norms of the residual base kernel and of the original kernel (a
  base closer to the original is the original, which the adapter does not
  belong to; a cast or quantized residual still passes)."""
  init: str
  residual_norm: float
  original_norm: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Any) -> ResidualMark:
    ok = isinstance(data, dict) and isinstance(data.get("init"), str) and all(
        isinstance(data.get(k), (int, float)) and not isinstance(
            data.get(k), bool) for k in ("residual_norm", "original_norm"))
    if not ok or set(data) != {"init", "residual_norm", "original_norm"}:
      raise ValueError(f"not a residual mark: {data!r}.")
    return cls(data["init"], float(data["residual_norm"]),
               float(data["original_norm"]))


def kernel_norm(w: Any) -> float:
  """The Frobenius norm of a concrete kernel, as a Python float."""
  return float(jnp.linalg.norm(jnp.asarray(w, jnp.float32).reshape(-1)))


def delta_weight(delta: LoraDelta, dtype: Any = None) -> jax.Array:
  """Materialises ``scale * a @ b`` in the kernel's axis order.

  The product is taken as one batched 2-D matmul (flattening the input and
  output groups), then reshaped and transposed back to the kernel's layout.

  Args:
    delta: one :class:`lora_jax.LoraDelta`.
    dtype: the dtype of the product; None keeps the factors'. A wider
      dtype than the factors' is also the one the product is computed in
      (bf16 factors on a float32 kernel are not rounded to bf16 on the way).

  Returns:
    An array of the kernel's shape.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = lj.LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)), scale=0.5,
  ...                  layout=lj.Layout.transposed())   # kernel stored (2, 3)
  >>> lj.delta_weight(d)
  Array([[0.5, 0.5, 0.5],
         [0.5, 0.5, 0.5]], dtype=float32)
  """
  layout = delta.layout
  a, b = layout.flatten_factors(delta.a, delta.b)
  if dtype is not None:  # computed in the wider of the factors' and dtype
    a = a.astype(jnp.promote_types(a.dtype, dtype))
    b = b.astype(jnp.promote_types(b.dtype, dtype))
  scale: Any = jnp.asarray(delta.scale)
  if scale.ndim:  # one scale per rank (a stack's row: LoraStack.row_of_all)
    a, scale = a * scale.astype(a.dtype), 1
  w = jnp.einsum("gir,gro->gio", a, b,
                 precision=jax.lax.Precision.HIGHEST) * scale
  w = layout.unflatten(w, delta.kernel_shape)
  return w if dtype is None else w.astype(dtype)


def is_delta_or_none(x: Any) -> bool:
  """``is_leaf`` for walking delta trees: stops at adapters (a
  :class:`LoraDelta`, trainable tokens) and empty slots."""
  return x is None or getattr(type(x), "_DELTA_LEAF", False)


def adapters(delta_tree: Any) -> dict[str, LoraDelta]:
  """``{path: LoraDelta}`` for every adapter in a delta tree.

  The same for a delta from ``split`` (with ``None`` slots, or NNX
  ``State``) and one from ``load``.

  Args:
    delta_tree: a delta tree (stacks are skipped: see ``LoraStack``).

  Returns:
    A dict from ``'/'``-joined leaf path to :class:`lora_jax.LoraDelta`, in
    tree order.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> _, delta = lj.split({"a": {"kernel": jnp.ones((4, 4))}, "b": jnp.ones(4)},
  ...                     lj.LoraConfig(rank=2), jax.random.key(0))
  >>> list(lj.adapters(delta))
  ['a/kernel']
  """
  return {p: d for p, d in leaves_with_paths(delta_tree, is_leaf=is_delta_or_none)
          if isinstance(d, LoraDelta)}


def check_same_kernel(who: str, noun: str, k: int, path: str, d: LoraDelta,
                      first: LoraDelta, remedy: str) -> None:
  """Raises unless adapter ``d`` (the ``k``-th ``noun``) updates the same
  kernel, in the same layout, as ``first`` (the 0-th), naming the path."""
  if d.layout != first.layout or d.kernel_shape != first.kernel_shape:
    raise ValueError(
        f"{who}: {noun} {k} at {path!r} updates a kernel of shape "
        f"{d.kernel_shape} with {d.layout}; {noun} 0 updates "
        f"{first.kernel_shape} with {first.layout}. {remedy}")
