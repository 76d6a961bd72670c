"""Kernel layouts: which axes of a kernel are batch, input and output axes.

A LoRA update of a kernel ``W`` of any rank is ``delta_W[..., i, o] =
scale * sum_r a[..., i, r] * b[..., r, o]``, where the kernel's axes are split
into batch axes (stacked layers, experts), input axes (contracted with the
activation) and output axes. ``a`` has shape ``(*batch, *in, rank)`` and ``b``
has shape ``(*batch, rank, *out)``, each group in the kernel's own axis order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


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
  def dense(cls) -> "Layout":
    """The Flax convention for a 2-D kernel: ``(in, out)``, ``y = x @ W``."""
    return cls((), (0,), (1,))

  @classmethod
  def transposed(cls) -> "Layout":
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

  def kernel_shape(self, a_shape: Sequence[int], b_shape: Sequence[int]):
    """The kernel shape that factors of these shapes update."""
    nb, ni = len(self.batch), len(self.inputs)
    by_role = dict(zip(self.order, (*a_shape[:nb + ni], *b_shape[nb + 1:])))
    return tuple(by_role[i] for i in range(self.ndim))

  def to_json(self) -> dict:
    return {"batch": list(self.batch), "inputs": list(self.inputs),
            "outputs": list(self.outputs)}

  @classmethod
  def from_json(cls, data: dict) -> "Layout":
    return cls(data["batch"], data["inputs"], data["outputs"])
