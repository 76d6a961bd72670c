"""The product with a narrow frozen kernel: ``op(x, w)`` where ``w`` is
stored as a :class:`QArray` or a narrow float (bf16) that the program widens.

The float kernel is built at the point of use and rebuilt in the backward
pass, so no widened copy lives across the step: the forward pass keeps the
codes (or the bf16 array), not the float copy. Both passes build it only once
the activation (forward) or cotangent (backward) exists
(:func:`ordering.after`), so on XLA:CPU at most a layer's float copy is live
at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.factored.ordering import after
from lora_jax._src.quant import QArray
from lora_jax._src.quant import dequantize_array


def float_kernel(kernel: Any, anchor: Any, dtype: Any) -> jax.Array:
  """``kernel`` dequantized / widened to ``dtype``, built after ``anchor``."""
  kernel = after(kernel, anchor)
  w = dequantize_array(kernel) if isinstance(kernel, QArray) else kernel
  return w.astype(dtype)


def _zero_cotangent(x: Any) -> Any:
  if x is None:
    return None
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)  # x's type: its sharding under Explicit axes
  return np.zeros(x.shape, jax.dtypes.float0)


def frozen_linear(op: Callable[[jax.Array, jax.Array], jax.Array],
                  x: jax.Array, kernel: Any, dtype: Any = None) -> jax.Array:
  """``op(x, w)`` with ``w`` the float kernel of a frozen narrow ``kernel``.

  The gradient flows to ``x`` only: the kernel is frozen (its cotangent is
  zero). Reverse mode only: this is a ``custom_vjp``.

  Args:
    op: ``(x, w) -> y``, linear in ``x`` (a matmul, ``dot_general``, a
      convolution).
    x: the activation.
    kernel: a ``QArray`` or a float array (e.g. bfloat16).
    dtype: the kernel's compute dtype (default: ``x``'s).

  Returns:
    ``op(x, w)``.
  """
  dtype = jnp.dtype(dtype or x.dtype)
  # x's type (under Explicit mesh axes its sharding too), static: not a
  # residual
  x_like = jc.abstract_like(x)

  @jax.custom_vjp
  def apply(x, kernel):
    return op(x, float_kernel(kernel, x, dtype))

  def forward(x, kernel):
    return apply(x, kernel), kernel

  def backward(kernel, g):
    w = float_kernel(kernel, g, dtype)
    (dx,) = jax.linear_transpose(lambda x: op(x, w), x_like)(g)
    return dx, jax.tree.map(_zero_cotangent, kernel)

  apply.defvjp(forward, backward)
  return apply(x, kernel)
