"""Factor initialisations: random (PEFT's default, Gaussian), principal
(PiSSA by SVD or randomised SVD, OLoRA by QR), and converting a principal
adapter back into a plain LoRA adapter against the original weights."""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src import dora
from lora_jax._src.config import InitSpec
from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import ResidualMark
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_concrete
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.delta import kernel_norm
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import map_with_paths


def principal_factors(w: jax.Array, layout: Layout, rank: int, scale: float,
                      init: InitSpec, key: jax.Array):
  """PiSSA / OLoRA factors of ``w`` and the residual ``w - scale * a @ b``.

  Per batch entry, ``w`` is seen as a ``(K, N)`` matrix ``M`` (inputs by
  outputs). PiSSA: ``M ~ U S V^T``, ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r /
  s) V_r^T``, so ``s a b`` is the best rank-r approximation of ``M`` (with
  ``init.niter`` set, by randomised SVD with that many power iterations).
  OLoRA: the QR of PEFT's ``(out, in)`` weight ``M^T = Q R``, ``b = Q_r^T``,
  ``a = R_r^T`` (PEFT keeps ``s`` out of the factors there).

  Args:
    w: the kernel.
    layout: its layout.
    rank: the adapter's rank.
    scale: the adapter's scale.
    init: the parsed init (kind ``"pissa"`` or ``"olora"``).
    key: randomness of the randomised SVD.

  Returns:
    ``(a, b, residual)``, the factors in float32.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> from lora_jax._src.config import InitSpec
  >>> w = jnp.diag(jnp.array([3., 2., 1.]))
  >>> a, b, res = principal_factors(w, lj.Layout.dense(), 1, 1.0,
  ...                               InitSpec("pissa"), jax.random.key(0))
  >>> res
  Array([[0., 0., 0.],
         [0., 2., 0.],
         [0., 0., 1.]], dtype=float32)
  """
  shape = tuple(w.shape)
  m = layout.flatten(w).astype(jnp.float32)
  if init.kind == "olora":
    q, r_ = jnp.linalg.qr(jnp.swapaxes(m, 1, 2))  # (g, n, min), (g, min, k)
    b = jnp.swapaxes(q[:, :, :rank], 1, 2)        # (g, r, n)
    a = jnp.swapaxes(r_[:, :rank, :], 1, 2)       # (g, k, r)
  else:
    u, sv, vt = (jnp.linalg.svd(m, full_matrices=False) if init.niter is None
                 else _randomized_svd(m, rank, init.niter, key))
    root = jnp.sqrt(sv[:, :rank] / scale)
    a = u[:, :, :rank] * root[:, None, :]
    b = root[:, :, None] * vt[:, :rank, :]
  a, b = layout.unflatten_factors(a, b, shape)
  residual = w - LoraDelta(a, b, scale, layout).weight().astype(w.dtype)
  return a, b, residual


def _randomized_svd(m: jax.Array, rank: int, niter: int, key: jax.Array):
  """Halko et al.'s randomised SVD of ``(g, k, n)`` matrices, ``niter`` power
  iterations."""
  _, k, n = m.shape
  p = min(rank + 8, k, n)
  omega = jax.random.normal(key, (m.shape[0], n, p), m.dtype)
  y = m @ omega
  for _ in range(niter):
    y = m @ (jnp.swapaxes(m, 1, 2) @ jnp.linalg.qr(y)[0])
  q = jnp.linalg.qr(y)[0]
  ub, sv, vt = jnp.linalg.svd(jnp.swapaxes(q, 1, 2) @ m, full_matrices=False)
  return q @ ub, sv, vt


def make_adapter(path: str, x: Any, layout: Layout, config: LoraConfig,
                 key: jax.Array, dtype: Any):
  """The initial adapter of one kernel, and its residual base kernel.

  Checks the layout and rank against the kernel (errors name ``path``), draws
  the factors by ``config.init``, marks a principal-init adapter with the
  norms of its residual and original kernels (when ``x`` is concrete), and
  sets DoRA's magnitude so that the adapted kernel equals the base at init.

  Args:
    path: the leaf path.
    x: the kernel (an array or a ``ShapeDtypeStruct``).
    layout: its layout.
    config: the config.
    key: this leaf's key.
    dtype: the factors' dtype.

  Returns:
    ``(delta, residual)``; ``residual`` is None unless the init is principal.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> d, res = make_adapter("w", jnp.ones((4, 3)), lj.Layout.dense(),
  ...                       lj.LoraConfig(rank=2), jax.random.key(0),
  ...                       jnp.float32)
  >>> d, res
  (LoraDelta(rank=2, kernel=(4, 3), a=f32[4,2], b=f32[2,3], scale=8), None)
  """
  shape = tuple(x.shape)
  layout.check_kernel(shape, path)
  rank, scale = config.rank_for(path), config.scale_for(path)
  max_rank = layout.max_rank(shape)
  if rank > max_rank:
    raise ValueError(
        f"rank {rank} is larger than the smaller side ({max_rank}) of "
        f"{path!r} (shape {shape}, inputs {layout.inputs}, outputs "
        f"{layout.outputs}). Use rank <= {max_rank} or exclude the leaf.")
  residual, mark = None, None
  if config.init_spec.principal:
    a, b, residual = principal_factors(x, layout, rank, scale,
                                       config.init_spec, key)
    a, b = a.astype(dtype), b.astype(dtype)
    if is_concrete(x):
      mark = ResidualMark(config.init_spec.kind, kernel_norm(residual),
                          kernel_norm(x))
  else:
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    fan_in = math.prod(layout.sizes(shape)[1])
    a, b = init_factors(config.init, key, a_shape, b_shape, dtype, fan_in,
                        rank)
  d = LoraDelta(a, b, scale=scale, layout=layout, dropout=config.dropout,
                residual_of=mark)
  if config.dora:
    # ||W0 + s a b|| over the input axes: the adapted kernel at init is W0.
    w0 = x if residual is None else residual
    d = d.replace(magnitude=dora.init_magnitude(w0, d, dtype))
  return d, residual


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
  the trained one; the result merges into the original ``params``. (The
  principal adapter itself carries a mark that makes :func:`lora_jax.merge`
  and an eager :func:`lora_jax.wrap` refuse the original weights; the
  converted one has none. Under ``jit`` the mark cannot be checked.)

  Args:
    initial: the delta ``split`` returned with a principal init.
    trained: the same delta after training.

  Returns:
    A delta of rank ``2r`` adapters (no residual-base mark) that merges into
    the original parameters.

  Raises:
    ValueError: an adapter of ``trained`` has no initial adapter, or is a
      DoRA adapter (its update is not low-rank in ``W``).

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
    return d.replace(a=a, b=b, residual_of=None)  # now for the original W
  return map_with_paths(
      lambda p, d: convert(p, d) if isinstance(d, LoraDelta) else d, trained,
      is_leaf=is_delta_or_none)
