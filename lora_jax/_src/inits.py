"""Factor initialisations: random (PEFT's default, Gaussian), principal
(PiSSA by SVD or randomised SVD, OLoRA by QR), and converting a principal
adapter back into a plain LoRA adapter against the original weights."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lora_jax._src.delta import LoraDelta, adapters, is_delta_or_none
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import map_with_paths


def principal_factors(w: jax.Array, layout: Layout, rank: int, scale: float,
               method: str, key: jax.Array):
  """PiSSA / OLoRA factors of ``w`` and the residual ``w - scale * a @ b``.

  Per batch entry, ``w`` is seen as a ``(K, N)`` matrix ``M`` (inputs by
  outputs). PiSSA: ``M ~ U S V^T``, ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r /
  s) V_r^T``, so ``s a b`` is the best rank-r approximation of ``M``. OLoRA:
  the QR of PEFT's ``(out, in)`` weight ``M^T = Q R``, ``b = Q_r^T``,
  ``a = R_r^T`` (PEFT keeps ``s`` out of the factors there).
  """
  batch, ins, outs = layout.sizes(w.shape)
  g, k, n = math.prod(batch), math.prod(ins), math.prod(outs)
  m = jnp.transpose(w, layout.order).reshape(g, k, n).astype(jnp.float32)
  if method == "olora":
    q, r_ = jnp.linalg.qr(jnp.swapaxes(m, 1, 2))  # (g, n, min), (g, min, k)
    b = jnp.swapaxes(q[:, :, :rank], 1, 2)        # (g, r, n)
    a = jnp.swapaxes(r_[:, :rank, :], 1, 2)       # (g, k, r)
  else:
    if method == "pissa":
      u, sv, vt = jnp.linalg.svd(m, full_matrices=False)
    else:  # randomised SVD, Halko et al., with `niter` power iterations
      niter = int(method[len("pissa_niter_"):])
      p = min(rank + 8, k, n)
      omega = jax.random.normal(key, (g, n, p), m.dtype)
      y = m @ omega
      for _ in range(niter):
        y = m @ (jnp.swapaxes(m, 1, 2) @ jnp.linalg.qr(y)[0])
      q = jnp.linalg.qr(y)[0]
      ub, sv, vt = jnp.linalg.svd(jnp.swapaxes(q, 1, 2) @ m,
                                  full_matrices=False)
      u = q @ ub
    root = jnp.sqrt(sv[:, :rank] / scale)
    a = u[:, :, :rank] * root[:, None, :]
    b = root[:, :, None] * vt[:, :rank, :]
  a = a.reshape(*batch, *ins, rank)
  b = b.reshape(*batch, rank, *outs)
  residual = w - LoraDelta(a, b, scale, layout).weight().astype(w.dtype)
  return a, b, residual


def init_factors(init: str | Callable, key: jax.Array, a_shape, b_shape,
                 dtype, fan_in: int, rank: int):
  """Initial ``(a, b)``: B = 0 so the adapted model equals the base at init."""
  if callable(init):
    a, b = init(key, a_shape, b_shape, dtype, fan_in)
    if tuple(a.shape) != tuple(a_shape) or tuple(b.shape) != tuple(b_shape):
      raise ValueError(
          f"LoraConfig.init callable returned shapes {a.shape}, {b.shape}; "
          f"expected {tuple(a_shape)}, {tuple(b_shape)}.")
    return a.astype(dtype), b.astype(dtype)
  if init == "default":
    # torch's kaiming_uniform_(a=sqrt(5)) over fan-in, as PEFT initialises
    # lora_A: gain sqrt(2 / 6), bound = gain * sqrt(3 / fan_in) = 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
  elif init == "gaussian":
    a = jax.random.normal(key, a_shape, dtype) / rank
  else:
    raise ValueError(f"Unknown init {init!r}.")
  return a, jnp.zeros(b_shape, dtype)


def to_plain_lora(initial: Any, trained: Any) -> Any:
  """A PiSSA/OLoRA adapter as a plain LoRA adapter on the *original* weights.

  ``split`` with ``init="pissa"`` (or ``"olora"``) returns a residual base
  ``W_res = W - s a0 b0``. After training, ``W_res + s a b = W + s (a b - a0
  b0)``, a rank-``2r`` update of ``W``: ``a' = [a | a0]``, ``b' = [b ; -b0]``
  (PEFT's conversion). ``initial`` is the delta ``split`` returned, ``trained``
  the trained one; the result merges into the original ``params``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> w = jax.random.normal(jax.random.key(0), (6, 5))
  >>> cfg = lj.LoraConfig(rank=2, targets="w", init="pissa")
  >>> base, d0 = lj.split({"w": w}, cfg, jax.random.key(1))
  >>> d1 = jax.tree.map(lambda x: x * 1.1, d0)  # "trained"
  >>> plain = lj.to_plain_lora(d0, d1)
  >>> plain["w"].rank
  4
  >>> bool(jnp.allclose(lj.merge({"w": w}, plain)["w"], lj.merge(base, d1)["w"],
  ...                   atol=1e-5))
  True
  """
  init = adapters(initial)

  def convert(path, d):
    d0 = init.get(path)
    if d0 is None:
      raise ValueError(f"to_plain_lora: {path!r} has no initial adapter.")
    if d.magnitude is not None:
      raise ValueError(f"to_plain_lora: {path!r} is a DoRA adapter; its "
                       f"update is not low-rank in W and cannot be converted.")
    nb = len(d.layout.batch)
    a = jnp.concatenate([d.a, d0.a.astype(d.a.dtype)], axis=-1)
    b = jnp.concatenate([d.b, -d0.b.astype(d.b.dtype)], axis=nb)
    return d.replace(a=a, b=b)
  return map_with_paths(
      lambda p, d: convert(p, d) if isinstance(d, LoraDelta) else d, trained,
      is_leaf=is_delta_or_none)
