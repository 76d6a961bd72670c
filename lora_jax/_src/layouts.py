"""Kernel layouts: which axes of a kernel are batch, input and output axes.

A LoRA update of a kernel ``W`` of any rank is ``delta_W[..., i, o] =
scale * sum_r a[..., i, r] * b[..., r, o]``, where the kernel's axes are split
into batch axes (stacked layers, experts), input axes (contracted with the
activation) and output axes. ``a`` has shape ``(*batch, *in, rank)`` and ``b``
has shape ``(*batch, rank, *out)``, each group in the kernel's own axis order.

:class:`Layout` is the one home of every axis computation on a kernel and its
factors: flattening to ``(G, K, N)`` and back (:meth:`Layout.flatten`,
:meth:`Layout.unflatten`, :meth:`Layout.flatten_factors`), where each kernel
axis sits in ``a`` and ``b`` (:meth:`Layout.factor_positions`), placing a
per-output value against the kernel or an op's output
(:meth:`Layout.broadcast_outputs`, :meth:`Layout.place_outputs`) and
PEFT's torch ``(out, in)`` view (:meth:`Layout.to_out_in`,
:meth:`Layout.factors_to_out_in` and their inverses).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc


def _axes(value: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Roles of a kernel's axes; every axis has exactly one role.

  Attributes:
    batch: axes that index independent kernels (scanned layers, experts).
    inputs: axes contracted with the activation (for a conv: spatial and
      input-feature axes; for an embedding table: the vocabulary axis).
    outputs: axes of the result.

  >>> Layout.dense()                      # Flax Dense kernel, (in, out)
  Layout(batch=(), inputs=(0,), outputs=(1,))
  >>> Layout(batch=(), inputs=(1,), outputs=(0,)).factor_shapes((512, 64), 8)
  ((64, 8), (8, 512))
  """

  batch: tuple[int, ...] = ()
  inputs: tuple[int, ...] = (0,)
  outputs: tuple[int, ...] = (1,)

  def __post_init__(self):
    for name in ("batch", "inputs", "outputs"):
      object.__setattr__(self, name, _axes(getattr(self, name)))
    axes = self.batch + self.inputs + self.outputs
    if sorted(axes) != list(range(len(axes))):
      raise ValueError(
          f"Layout{(self.batch, self.inputs, self.outputs)} must assign each "
          f"axis 0..n-1 of the kernel exactly one role (batch, inputs or "
          f"outputs); got axes {axes}.")
    if not self.inputs or not self.outputs:
      raise ValueError(
          "A Layout needs at least one input axis and one output axis; got "
          f"inputs={self.inputs}, outputs={self.outputs}.")

  @classmethod
  def dense(cls) -> Layout:
    """The Flax convention for a 2-D kernel: ``(in, out)``, ``y = x @ W``."""
    return cls((), (0,), (1,))

  @classmethod
  def transposed(cls) -> Layout:
    """A 2-D kernel stored ``(out, in)`` and used as ``x @ W.T``."""
    return cls((), (1,), (0,))

  @property
  def ndim(self) -> int:
    return len(self.batch) + len(self.inputs) + len(self.outputs)

  @property
  def order(self) -> tuple[int, ...]:
    """Kernel axes in factor order: batch, then inputs, then outputs."""
    return self.batch + self.inputs + self.outputs

  def sizes(self, shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """``(batch dims, input dims, output dims)`` of a kernel of ``shape``."""
    return (tuple(shape[i] for i in self.batch),
            tuple(shape[i] for i in self.inputs),
            tuple(shape[i] for i in self.outputs))

  def factor_shapes(self, shape: Sequence[int], rank: int):
    """Shapes ``(a_shape, b_shape)`` of rank-``rank`` factors of a kernel."""
    batch, ins, outs = self.sizes(shape)
    return (*batch, *ins, rank), (*batch, rank, *outs)

  def max_rank(self, shape: Sequence[int]) -> int:
    """The largest rank a low-rank update of this kernel can have."""
    _, ins, outs = self.sizes(shape)
    return min(math.prod(ins), math.prod(outs))

  def check_kernel(self, shape: Sequence[int], path: str) -> None:
    """Raises a ``ValueError`` naming ``path`` unless this layout fits a
    kernel of ``shape``.

    Args:
      shape: the kernel's shape.
      path: the leaf path, for the message.

    Returns:
      None.

    >>> try:
    ...   Layout.dense().check_kernel((4, 3, 2), "mlp/kernel")
    ... except ValueError as e:
    ...   print(str(e)[:29])
    The layout of 'mlp/kernel' (L
    """
    if self.ndim != len(shape):
      raise ValueError(
          f"The layout of {path!r} ({self}) is for a kernel of {self.ndim} "
          f"axes but the kernel has shape {tuple(shape)}. Give it "
          f"LoraConfig(layouts={{{path!r}: lora_jax.Layout(...)}}) with one "
          f"role per axis.")

  def factor_positions(self):
    """Where each kernel axis sits in the factors.

    Returns:
      ``(in_a, in_b, rank_a, rank_b)``: ``in_a`` maps each batch and input
      axis of the kernel to its axis in ``a``, ``in_b`` each batch and output
      axis to its axis in ``b``; ``rank_a`` / ``rank_b`` are the rank axes.

    >>> Layout((0,), (2,), (1,)).factor_positions()
    ({0: 0, 2: 1}, {0: 0, 1: 2}, 2, 1)
    """
    nb = len(self.batch)
    in_a = {k: i for i, k in enumerate(self.batch + self.inputs)}
    in_b = {k: i for i, k in enumerate(self.batch)}
    in_b.update({k: nb + 1 + i for i, k in enumerate(self.outputs)})
    return in_a, in_b, nb + len(self.inputs), nb

  def kernel_shape(self, a_shape: Sequence[int], b_shape: Sequence[int]):
    """The kernel shape that factors of these shapes update.

    >>> Layout.transposed().kernel_shape((3, 1), (1, 2))
    (2, 3)
    """
    in_a, in_b, _, _ = self.factor_positions()
    size = {k: a_shape[i] for k, i in in_a.items()}
    size.update({k: b_shape[i] for k, i in in_b.items() if k not in size})
    return tuple(size[k] for k in range(self.ndim))

  def flatten(self, w: Any) -> Any:
    """A kernel as ``(G, K, N)``: batch, input and output groups flattened,
    in factor order (what ``a`` ``(G, K, r)`` and ``b`` ``(G, r, N)`` multiply).

    Args:
      w: an array of this layout.

    Returns:
      ``w`` transposed and reshaped to ``(G, K, N)``.

    >>> import jax.numpy as jnp
    >>> Layout.transposed().flatten(jnp.zeros((5, 3))).shape
    (1, 3, 5)
    """
    batch, ins, outs = self.sizes(w.shape)
    return jc.reshape(jnp.transpose(w, self.order), (
        math.prod(batch), math.prod(ins), math.prod(outs)))

  def unflatten(self, m: Any, shape: Sequence[int]) -> Any:
    """Inverse of :meth:`flatten`: a ``(G, K, N)`` array as a kernel of
    ``shape``.

    Args:
      m: a ``(G, K, N)`` array.
      shape: the kernel's shape.

    Returns:
      ``m`` reshaped and transposed into the kernel's axis order.

    >>> import jax.numpy as jnp
    >>> lay = Layout((0,), (2,), (1,))
    >>> w = jnp.arange(24.).reshape(2, 3, 4)
    >>> bool((lay.unflatten(lay.flatten(w), w.shape) == w).all())
    True
    """
    batch, ins, outs = self.sizes(shape)
    return jnp.transpose(jc.reshape(m, (*batch, *ins, *outs)),
                         self._inverse_order)

  @property
  def _inverse_order(self) -> list[int]:
    return sorted(range(self.ndim), key=lambda k: self.order[k])

  def flatten_factors(self, a: Any, b: Any):
    """``a`` as ``(G, K, r)`` and ``b`` as ``(G, r, N)``.

    >>> import jax.numpy as jnp
    >>> a, b = Layout((0,), (1, 2), (3,)).flatten_factors(
    ...     jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 5, 6)))
    >>> a.shape, b.shape
    ((2, 12, 5), (2, 5, 6))
    """
    nb = len(self.batch)
    g = math.prod(a.shape[:nb])
    return (jc.reshape(a, (g, math.prod(a.shape[nb:-1]), a.shape[-1])),
            jc.reshape(b, (g, b.shape[nb], math.prod(b.shape[nb + 1:]))))

  def unflatten_factors(self, a: Any, b: Any, shape: Sequence[int]):
    """Inverse of :meth:`flatten_factors` for a kernel of ``shape``.

    >>> import jax.numpy as jnp
    >>> a, b = Layout.transposed().unflatten_factors(
    ...     jnp.zeros((1, 3, 2)), jnp.zeros((1, 2, 5)), (5, 3))
    >>> a.shape, b.shape
    ((3, 2), (2, 5))
    """
    a_shape, b_shape = self.factor_shapes(shape, a.shape[-1])
    return jc.reshape(a, a_shape), jc.reshape(b, b_shape)

  def broadcast_outputs(self, values: Any) -> Any:
    """A per-output ``(*batch, *out)`` array (DoRA's magnitude or norm)
    transposed and padded with size-1 axes so it broadcasts against the
    kernel.

    Args:
      values: an array of shape ``(*batch, *out)`` in factor order.

    Returns:
      ``values`` with the kernel's rank, size 1 on the input axes.

    >>> import jax.numpy as jnp
    >>> Layout.transposed().broadcast_outputs(jnp.arange(5.)).shape
    (5, 1)
    """
    axes = self.batch + self.outputs
    return self.place_outputs(values, dict(zip(axes, axes)), self.ndim)

  def place_outputs(self, values: Any, positions: dict[int, int],
                    ndim: int) -> Any:
    """A per-output ``(*batch, *out)`` array laid out to broadcast against
    any array whose axis ``positions[k]`` stands for kernel axis ``k`` (the
    kernel itself, a matmul's or a conv's output), size 1 elsewhere.

    Args:
      values: an array of shape ``(*batch, *out)`` in factor order.
      positions: for every batch and output axis ``k`` of the kernel, the
        axis of the target that holds it.
      ndim: the target's rank.

    Returns:
      ``values`` transposed and reshaped to rank ``ndim``.

    >>> import jax.numpy as jnp
    >>> lay = Layout((0,), (1,), (2,))                 # (layers, in, out)
    >>> # y = einsum("lbi,lio->lbo", x, w): layers at 0, outputs at 2
    >>> lay.place_outputs(jnp.ones((3, 4)), {0: 0, 2: 2}, 3).shape
    (3, 1, 4)
    """
    axes = self.batch + self.outputs
    order = sorted(range(len(axes)), key=lambda i: positions[axes[i]])
    shape = [1] * ndim
    for i in order:
      shape[positions[axes[i]]] = values.shape[i]
    return jc.reshape(jnp.transpose(values, order), shape)

  def magnitude_axis(self, k: int) -> int | None:
    """Axis of kernel axis ``k`` in a per-output ``(*batch, *out)`` array;
    None for an input axis.

    >>> Layout((0,), (2,), (1,)).magnitude_axis(1)
    1
    """
    if k in self.batch:
      return self.batch.index(k)
    if k in self.outputs:
      return len(self.batch) + self.outputs.index(k)
    return None

  def to_out_in(self, w: Any) -> Any:
    """PEFT's view of a kernel: torch ``nn.Linear.weight`` ``(out, in)`` per
    batch entry, i.e. ``(G, N, K)`` with the groups flattened.

    Args:
      w: an array of this layout.

    Returns:
      The ``(G, N, K)`` array; ``[0]`` is the torch weight of an unbatched
      kernel.

    >>> import jax.numpy as jnp
    >>> Layout.dense().to_out_in(jnp.zeros((3, 5))).shape
    (1, 5, 3)
    """
    return jnp.swapaxes(self.flatten(w), 1, 2)

  def from_out_in(self, m: Any, shape: Sequence[int]) -> Any:
    """Inverse of :meth:`to_out_in`: a ``(G, N, K)`` torch-style weight as a
    kernel of ``shape``.

    >>> import jax.numpy as jnp
    >>> Layout.dense().from_out_in(jnp.zeros((1, 5, 3)), (3, 5)).shape
    (3, 5)
    """
    return self.unflatten(jnp.swapaxes(m, 1, 2), shape)

  def factors_to_out_in(self, a: Any, b: Any):
    """PEFT's ``lora_A.weight`` ``(G, r, K)`` and ``lora_B.weight`` ``(G, N,
    r)`` of factors ``a``, ``b`` (``delta W^T = B A`` per batch entry).

    >>> import jax.numpy as jnp
    >>> A, B = Layout.dense().factors_to_out_in(jnp.zeros((3, 2)),
    ...                                         jnp.zeros((2, 5)))
    >>> A.shape, B.shape
    ((1, 2, 3), (1, 5, 2))
    """
    a2, b2 = self.flatten_factors(a, b)
    return jnp.swapaxes(a2, 1, 2), jnp.swapaxes(b2, 1, 2)

  def factors_from_out_in(self, lora_a: Any, lora_b: Any,
                          shape: Sequence[int]):
    """Inverse of :meth:`factors_to_out_in`: ``(a, b)`` for a kernel of
    ``shape`` from PEFT's ``(G, r, K)`` and ``(G, N, r)`` weights.

    >>> import jax.numpy as jnp
    >>> a, b = Layout.dense().factors_from_out_in(jnp.zeros((1, 2, 3)),
    ...                                           jnp.zeros((1, 5, 2)), (3, 5))
    >>> a.shape, b.shape
    ((3, 2), (2, 5))
    """
    return self.unflatten_factors(jnp.swapaxes(lora_a, 1, 2),
                                  jnp.swapaxes(lora_b, 1, 2), shape)

  def to_json(self) -> dict:
    """``{"batch": [...], "inputs": [...], "outputs": [...]}``.

    >>> Layout.dense().to_json()
    {'batch': [], 'inputs': [0], 'outputs': [1]}
    """
    return {"batch": list(self.batch), "inputs": list(self.inputs),
            "outputs": list(self.outputs)}

  @classmethod
  def from_json(cls, data: Any) -> Layout:
    """Inverse of :meth:`to_json`; a ``ValueError`` for anything else.

    >>> Layout.from_json({"batch": [], "inputs": [1], "outputs": [0]})
    Layout(batch=(), inputs=(1,), outputs=(0,))
    """
    names = ("batch", "inputs", "outputs")
    if not isinstance(data, dict) or not all(
        isinstance(data.get(n), list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in data[n])
        for n in names):
      raise ValueError(f"not a layout: {data!r} (want lists of axis numbers "
                       f"under 'batch', 'inputs' and 'outputs').")
    return cls(*(data[n] for n in names))
