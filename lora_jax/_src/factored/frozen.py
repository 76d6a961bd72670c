"""The product with a narrow frozen kernel: ``op(x, w)`` where ``w`` is
stored as a :class:`QArray` or a narrow float (bf16) that the program widens.

The float kernel is built at the point of use and rebuilt in the backward
pass, so no widened copy lives across the step: the forward pass keeps the
codes (or the bf16 array), not the float copy. Both passes build it only once
the activation (forward) or cotangent (backward) exists
(:func:`ordering.after`), so on XLA:CPU at most a layer's float copy is live
at a time. That needs a ``custom_vjp`` (reverse mode only); with the engine's
``recompute=False`` the product is a ``custom_jvp`` instead, for forward mode
(:func:`frozen_linear`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.custom_derivatives import SymbolicZero
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


def _reverse_only(op, x, kernel, dtype) -> jax.Array:
  """The product as a ``custom_vjp``: the residual is the narrow kernel, and
  the backward pass widens it once the cotangent exists. Reverse mode only."""
  # x's type (under Explicit mesh axes its sharding too), static: not a
  # residual
  x_like = jc.abstract_like(x)

  @jax.custom_vjp
  def apply(x, kernel):
    return op(x, float_kernel(kernel, x, dtype))

  def forward(x, kernel):
    # the product itself, not ``apply``: a custom_vjp called inside its own
    # forward rule is what forward-over-reverse (jvp of grad) cannot trace
    return op(x, float_kernel(kernel, x, dtype)), kernel

  def backward(kernel, g):
    w = float_kernel(kernel, g, dtype)
    (dx,) = jax.linear_transpose(lambda x: op(x, w), x_like)(g)
    return dx, jax.tree.map(_zero_cotangent, kernel)

  apply.defvjp(forward, backward)
  return apply(x, kernel)


def _both_modes(op, x, kernel, dtype) -> jax.Array:
  """The product as a ``custom_jvp`` whose tangent ``op(dx, w)`` is linear
  in ``dx``: forward mode evaluates it, reverse mode transposes it. The
  tangent is a ``jax.checkpoint``, so reverse mode keeps the narrow kernel,
  not ``w``, and widens it again in the backward pass. That widening can
  wait for ``x`` (kept anyway for the adapter's ``dA = x^T g``) but not for
  the cotangent, which a transposed program cannot read, and XLA:CPU drops
  the checkpoint's optimization barriers: it widens every layer's kernel
  before the backward pass reaches it (W3 with ``recompute=False``: temp
  685 MiB on a bf16 base, 657 on nf4, 160 on float32; with the
  ``custom_vjp``, 269 / 231 / 106 with ``recompute=True``). GPU and TPU
  keep the barriers."""

  @jax.custom_jvp
  def apply(x, kernel):
    return op(x, float_kernel(kernel, x, dtype))

  def tangent(kernel, x, dx):
    # -x: an anchor other than the forward pass's x, so that XLA does not
    # merge the two widenings into one float copy kept between the passes
    return op(dx, float_kernel(kernel, jax.lax.neg(x), dtype))

  def jvp(primals, tangents):
    x, kernel = primals
    dx = tangents[0]  # the kernel is frozen: its tangent is not read
    y = apply(x, kernel)
    if isinstance(dx, SymbolicZero):
      return y, jnp.zeros_like(y)
    return y, jax.checkpoint(tangent)(kernel, x, dx)

  apply.defjvp(jvp, symbolic_zeros=True)
  return apply(x, kernel)


def frozen_linear(op: Callable[[jax.Array, jax.Array], jax.Array],
                  x: jax.Array, kernel: Any, dtype: Any = None,
                  reverse_only: bool = True) -> jax.Array:
  """``op(x, w)`` with ``w`` the float kernel of a frozen narrow ``kernel``.

  The derivative is taken in ``x`` only: the kernel is frozen (its
  cotangent is zero, its tangent not read).

  With ``reverse_only`` (the engine's ``recompute=True``) the product is a
  ``custom_vjp`` whose backward pass widens the kernel only once the
  cotangent exists, so at most a layer's float copy is live at a time.
  Forward mode cannot run through a ``custom_vjp``; where JAX says so while
  tracing (an eager ``jax.jvp``, ``jax.jacfwd``: "can't apply forward-mode
  autodiff"), the product is formed as without ``reverse_only`` instead.
  Under ``jit``, ``jvp`` and ``linearize`` only fail once lowered, where no
  library code runs: ``lj.wrap(..., recompute=False)`` is the remedy.
  Without ``reverse_only`` the product is a ``custom_jvp`` that supports
  both modes (:func:`_both_modes`).

  Args:
    op: ``(x, w) -> y``, linear in ``x`` (a matmul, ``dot_general``, a
      convolution).
    x: the activation.
    kernel: a ``QArray`` or a float array (e.g. bfloat16).
    dtype: the kernel's compute dtype (default: ``x``'s).
    reverse_only: a ``custom_vjp`` (see above).

  Returns:
    ``op(x, w)``.
  """
  dtype = jnp.dtype(dtype or x.dtype)
  if not reverse_only:
    return _both_modes(op, x, kernel, dtype)
  try:
    return _reverse_only(op, x, kernel, dtype)
  except TypeError as e:  # forward mode while tracing: no custom_vjp there
    if "forward-mode" not in str(e):
      raise
    return _both_modes(op, x, kernel, dtype)
