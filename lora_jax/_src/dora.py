"""DoRA (weight-decomposed LoRA): the norm, the magnitude, the merge, the
unmerge, and the per-output factor the factored engine applies.

The adapted kernel is ``m * V / ||V||`` with ``V = W0 + s a b``, the norm taken
per output unit over the input axes and held constant for gradients (as PEFT
and the paper). A plain LoRA adapter (no magnitude) is the case ``V`` alone,
so :func:`adapted_weight` and :func:`unmerged_weight` serve both.

The functions read ``delta.a``, ``delta.b``, ``delta.scale``,
``delta.layout``, ``delta.magnitude`` and ``delta.weight()`` of a
:class:`lora_jax.LoraDelta`; every axis computation is the layout's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc


def norm(w0: jax.Array, delta: Any, dtype: Any = None) -> jax.Array:
  """``||W0 + scale * a @ b||`` over the input axes, per output unit.

  Computed in low rank, never forming ``a @ b``: per output unit,
  ``||w||^2 + 2 s <w, a b> + s^2 ||a b||^2`` with ``<w, a b> = sum_r (a^T w) b``
  and ``||a b||^2 = b^T (a^T a) b``.

  Args:
    w0: the base kernel.
    delta: its adapter.
    dtype: the compute dtype; by default that of ``w0`` and ``a`` promoted.

  Returns:
    An array of shape ``(*batch, *out)``.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = lj.LoraDelta(jnp.zeros((3, 1)), jnp.zeros((1, 2)))
  >>> norm(jnp.full((3, 2), 2.0), d)
  Array([3.4641016, 3.4641016], dtype=float32)
  """
  lay = delta.layout
  dtype = dtype or jnp.result_type(w0.dtype, delta.a.dtype)
  batch, _, outs = lay.sizes(w0.shape)
  w = lay.flatten(w0).astype(dtype)
  a, b = (x.astype(dtype) for x in lay.flatten_factors(delta.a, delta.b))
  hi = jax.lax.Precision.HIGHEST
  s = delta.scale
  # batched over g, contracting k: under Explicit mesh axes a sharded k is
  # summed across the mesh (jaxpr_core.dot names the out_sharding)
  over_k = (((1,), (1,)), ((0,), (0,)))
  cross = jc.dot(a, w, over_k, precision=hi)   # (g, r, n)
  gram = jc.dot(a, a, over_k, precision=hi)    # (g, r, q)
  gb = jc.dot(gram, b, (((2,), (1,)), ((0,), (0,))), precision=hi)
  sq = (jnp.sum(w * w, axis=1) + 2 * s * jnp.sum(cross * b, axis=1)
        + s * s * jnp.sum(b * gb, axis=1))
  return jc.reshape(jnp.sqrt(jnp.maximum(sq, 0)), (*batch, *outs))


def init_magnitude(w0: jax.Array, delta: Any, dtype: Any) -> jax.Array:
  """DoRA's initial magnitude: the norm of the adapted kernel at init, so the
  adapted model equals the base.

  Args:
    w0: the base kernel (the residual for a principal init).
    delta: the adapter, without magnitude.
    dtype: the factors' dtype.

  Returns:
    ``(*batch, *out)`` magnitudes in ``dtype``.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = lj.LoraDelta(jnp.zeros((2, 1)), jnp.zeros((1, 2)))
  >>> init_magnitude(jnp.eye(2) * 3, d, jnp.float32)
  Array([3., 3.], dtype=float32)
  """
  return norm(w0, delta, dtype).astype(dtype)


def output_factor(w0: jax.Array, delta: Any, dtype: Any) -> jax.Array:
  """``magnitude / ||W0 + s a b||`` per output unit, the norm held constant
  for gradients: what multiplies each output of ``x @ (W0 + s a b)``.

  Args:
    w0: the base kernel.
    delta: a DoRA adapter.
    dtype: the compute dtype.

  Returns:
    A ``(*batch, *out)`` array (place it with
    :meth:`lora_jax.Layout.broadcast_outputs`).

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = lj.LoraDelta(jnp.zeros((2, 1)), jnp.zeros((1, 2)),
  ...                  magnitude=jnp.array([1., 6.]))
  >>> output_factor(jnp.eye(2) * 3, d, jnp.float32)
  Array([0.33333334, 2.        ], dtype=float32)
  """
  n = jax.lax.stop_gradient(norm(w0, delta, dtype))
  return delta.magnitude.astype(dtype) / n


def adapted_weight(w0: jax.Array, delta: Any) -> jax.Array:
  """The kernel the adapter stands for, in the base's dtype.

  LoRA: ``W0 + s a b``. DoRA: ``m (W0 + s a b) / ||W0 + s a b||`` with the norm
  held constant for gradients.

  Args:
    w0: the base kernel.
    delta: its adapter.

  Returns:
    The adapted kernel, computed in the wider of the base's and the
    factors' precision and rounded once.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = lj.LoraDelta(jnp.ones((2, 1)), jnp.ones((1, 2)), scale=0.5)
  >>> adapted_weight(jnp.zeros((2, 2)), d)
  Array([[0.5, 0.5],
         [0.5, 0.5]], dtype=float32)
  """
  dtype = jnp.result_type(w0.dtype, delta.a.dtype, delta.b.dtype)
  v = w0.astype(dtype) + delta.weight(dtype)
  if delta.magnitude is not None:
    v = v * delta.layout.broadcast_outputs(output_factor(w0, delta, dtype))
  return v.astype(w0.dtype)


def unmerged_weight(w: jax.Array, delta: Any, norms: Any = None,
                    path: str = "kernel") -> jax.Array:
  """Inverse of :func:`adapted_weight`: ``W0`` back from the merged kernel.

  LoRA: ``w - s a b``. DoRA: ``w * ||W0 + s a b|| / m - s a b``, which needs
  the norms taken before merging (:func:`lora_jax.dora_norms`).

  Args:
    w: the merged kernel.
    delta: its adapter.
    norms: DoRA only, ``(*batch, *out)`` norms of ``W0 + s a b``.
    path: the leaf path, for the error message.

  Returns:
    The base kernel in ``w``'s dtype.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = lj.LoraDelta(jnp.ones((1, 1)), jnp.ones((1, 3)), scale=0.5)
  >>> unmerged_weight(jnp.ones((1, 3)), d)
  Array([[0.5, 0.5, 0.5]], dtype=float32)
  """
  dtype = jnp.result_type(w.dtype, delta.a.dtype, delta.b.dtype)
  v = w.astype(dtype)
  if delta.magnitude is not None:
    if norms is None:
      raise ValueError(
          f"unmerge: {path!r} is a DoRA adapter; undoing it needs the norms "
          f"of W0 + s*A@B taken before merging: norms = "
          f"lora_jax.dora_norms(base, delta), then unmerge(params, delta, "
          f"norms).")
    v = v * delta.layout.broadcast_outputs(
        norms.astype(dtype) / delta.magnitude.astype(dtype))
  return (v - delta.weight(dtype)).astype(w.dtype)
