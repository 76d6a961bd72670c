"""LoftQ: a quantized base and LoRA factors chosen together.

QLoRA quantizes ``W`` and starts the adapter at zero, so the model starts
``W - dequant(Q)`` away from the float one. LoftQ (Li et al. 2023; PEFT's
``init_lora_weights="loftq"``) alternates, from ``s a b = 0``::

    Q     = quantize(W - s a b)                 # the base, given the adapter
    s a b = best rank-r approximation of W - dequant(Q)   # the adapter

``loftq_iters`` times, so that ``dequant(Q) + s a b`` approximates ``W``. One
step is QLoRA's quantization plus the SVD of its error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.quant import SCHEMES
from lora_jax._src.quant import QArray
from lora_jax._src.quant import dequantize
from lora_jax._src.quant import has_qarrays
from lora_jax._src.quant import quantize
from lora_jax._src.split import split

_HIGHEST = jax.lax.Precision.HIGHEST


def low_rank(m: jax.Array, rank: int, scale: float
             ) -> tuple[jax.Array, jax.Array]:
  """Factors ``a (G, K, r)``, ``b (G, r, N)`` with ``scale * a @ b`` the best
  rank-``rank`` approximation of each ``(K, N)`` matrix of ``m`` (float32),
  split as PEFT splits it (``sqrt`` of the singular values on each side).

  The top singular subspace comes from the symmetric eigendecomposition of
  the smaller Gram matrix (``m m^T`` or ``m^T m``), then the other side is
  ``m`` projected onto it: the same truncation as an SVD, about 15x faster
  than ``jnp.linalg.svd`` on CPU for a (1024, 4096) kernel. Directions with
  a zero singular value get zero factors.

  >>> import jax.numpy as jnp
  >>> m = jnp.array([[[3., 0.], [0., 1.], [0., 0.]]])
  >>> a, b = low_rank(m, 1, 1.0)
  >>> jnp.round(a @ b, 5)
  Array([[[3., 0.],
          [0., 0.],
          [0., 0.]]], dtype=float32)
  """
  m = m.astype(jnp.float32)
  k, n = m.shape[1], m.shape[2]
  mt = jnp.swapaxes(m, 1, 2)
  if k <= n:  # left singular vectors from m m^T (K, K)
    _, vecs = jnp.linalg.eigh(jnp.matmul(m, mt, precision=_HIGHEST))
    u = vecs[:, :, ::-1][:, :, :rank]                     # (G, K, r)
    sv_vt = jnp.matmul(jnp.swapaxes(u, 1, 2), m, precision=_HIGHEST)
    sv = jnp.linalg.norm(sv_vt, axis=2)                   # (G, r)
    root = jnp.sqrt(sv / scale)
    safe = jnp.where(sv > 0, sv, 1.0)
    a = u * root[:, None, :]
    b = (root / safe)[:, :, None] * sv_vt
  else:  # right singular vectors from m^T m (N, N)
    _, vecs = jnp.linalg.eigh(jnp.matmul(mt, m, precision=_HIGHEST))
    v = vecs[:, :, ::-1][:, :, :rank]                     # (G, N, r)
    u_sv = jnp.matmul(m, v, precision=_HIGHEST)           # (G, K, r)
    sv = jnp.linalg.norm(u_sv, axis=1)                    # (G, r)
    root = jnp.sqrt(sv / scale)
    safe = jnp.where(sv > 0, sv, 1.0)
    a = u_sv * (root / safe)[:, None, :]
    b = root[:, :, None] * jnp.swapaxes(v, 1, 2)
  return a, b


_LOW_RANK = jax.jit(low_rank, static_argnums=(1, 2))


def steps(params: Any, config: LoraConfig, key: jax.Array, scheme: str,
          block_size: int, double_quant: bool, apply_fn: Callable | None,
          example_args: Sequence[Any], example_kwargs: dict | None
          ) -> Iterator[tuple[Any, Any]]:
  """LoftQ's iterates: ``(quantized base, delta)`` after each step (the
  caller stops when it has had enough; :func:`loftq` after
  ``config.loftq_iters``)."""
  if config.init_spec.kind != "loftq":
    raise ValueError(
        f"lora_jax.loftq makes LoftQ adapters: pass a LoraConfig with "
        f"init='loftq' (and loftq_iters), got init={config.init!r}. For "
        f"other inits, split and quantize: base, delta = lora_jax.split("
        f"params, config, key); qbase = lora_jax.quantize(base, scheme, "
        f"targets=delta).")
  if config.dora:
    raise ValueError(
        "lora_jax.loftq: LoftQ with DoRA is not supported (the magnitude "
        "would have to follow the quantized base); use dora=False.")
  if scheme not in SCHEMES:
    raise ValueError(f"lora_jax.loftq: scheme must be one of {SCHEMES}, got "
                     f"{scheme!r}.")
  if has_qarrays(params):
    found = [p for p, x in leaves_with_paths(params) if isinstance(x, QArray)]
    raise ValueError(
        f"lora_jax.loftq needs the float weights (it quantizes them itself, "
        f"with the adapter): {found[:3]} are already quantized. Pass the "
        f"float params (lora_jax.dequantize loses what quantization lost).")
  base, delta = split(params, dataclasses.replace(config, init="default"),
                      key, apply_fn, example_args, example_kwargs)
  deltas = adapters(delta)
  weights = dict(leaves_with_paths(base))
  current: dict[str, Any] = {p: None for p in deltas}  # s a b, last step
  for _ in range(config.loftq_iters):
    target = map_with_paths(
        lambda p, w: w if current.get(p) is None else
        (w.astype(jnp.float32) - current[p]).astype(w.dtype), base)
    qbase = quantize(target, scheme, block_size, targets=delta,
                     double_quant=double_quant)
    deq = dict(leaves_with_paths(dequantize(qbase)))
    new = {}
    for p, d in deltas.items():
      w = weights[p]
      error = d.layout.flatten(w.astype(jnp.float32)
                               - deq[p].astype(jnp.float32))
      a, b = _LOW_RANK(error, d.rank, float(d.scale))
      a, b = d.layout.unflatten_factors(a, b, tuple(w.shape))
      new[p] = d.replace(a=a.astype(d.a.dtype), b=b.astype(d.b.dtype))
      current[p] = new[p].weight(jnp.float32)
    deltas = new
    yield qbase, map_with_paths(
        lambda p, x, new=new: new[p] if isinstance(x, LoraDelta) else x,
        delta, is_leaf=lambda x: x is None or isinstance(x, LoraDelta))


def loftq(params: Any, config: LoraConfig, key: jax.Array,
          scheme: str = "nf4", block_size: int = 64, *,
          double_quant: bool = False, apply_fn: Callable | None = None,
          example_args: Sequence[Any] = (),
          example_kwargs: dict | None = None) -> tuple[Any, Any]:
  """LoftQ: a quantized base and adapters that together approximate
  ``params``.

  The adapted kernels (``config``'s targets, as :func:`lora_jax.split`
  chooses them) are quantized with :func:`lora_jax.quantize` (``scheme``,
  ``block_size``, ``double_quant``; blocks along each kernel's contracted
  axis) and their factors set by ``config.loftq_iters`` alternating steps,
  as PEFT's ``loftq_init``: quantize ``W - s a b``, then set ``s a b`` to the
  best rank-``r`` approximation of ``W - dequant(Q)``. The first step is
  QLoRA's quantization of ``W`` plus the SVD of its error; each further step
  lowers ``||W - (dequant(Q) + s a b)||_F`` (``benchmarks/results/loftq_*``).
  The factors carry the adapter's scale ``s``: ``s a b`` is the rank-``r``
  approximation. PEFT 0.21 sets ``lora_A``, ``lora_B`` from the SVD without
  dividing by its ``scaling``, so its ``Q + s B A`` approximates ``W`` only
  at ``s = 1`` (``lora_alpha = r``); with ``s != 1`` the two differ, and
  lora_jax's is the one that approximates ``W``.
  Leaves not adapted stay as they are (quantize them too with
  ``lora_jax.quantize(qbase, ...)``, which skips the ``QArray`` leaves).

  Args:
    params: the float parameter tree (no ``QArray`` leaves).
    config: a :class:`lora_jax.LoraConfig` with ``init="loftq"``.
    key: only for the layout of the delta tree (the factors are
      deterministic).
    scheme: ``"nf4"`` or ``"int8"``.
    block_size: entries per quantization block.
    double_quant: QLoRA's double quantization of the block absmax.
    apply_fn: as for :func:`lora_jax.split` (layouts, ``"all-linear"``).
    example_args: as for :func:`lora_jax.split`.
    example_kwargs: as for :func:`lora_jax.split`.

  Returns:
    ``(qbase, delta)``: ``qbase`` holds a :class:`lora_jax.QArray` at each
    adapted kernel; use them as a QLoRA pair, ``lora_jax.wrap(f)(qbase,
    delta, x)``.

  Raises:
    ValueError: ``config.init`` is not ``"loftq"``, DoRA, an unknown
      scheme, or ``params`` already quantized.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> w = jax.random.normal(jax.random.key(0), (64, 32))
  >>> cfg = lj.LoraConfig(rank=4, targets="w", init="loftq", loftq_iters=2)
  >>> qbase, delta = lj.loftq({"w": w}, cfg, jax.random.key(1), "int8", 16)
  >>> qbase["w"]
  QArray(int8, f32[64,32], block 16)
  >>> qlora = lj.dequantize(lj.quantize({"w": w}, "int8", 16))["w"]  # b = 0
  >>> err = lambda approx: float(jnp.linalg.norm(w - approx))
  >>> bool(err(lj.merge(qbase, delta)["w"]) < err(qlora))
  True
  """
  *_, last = steps(params, config, key, scheme, block_size, double_quant,
                   apply_fn, example_args, example_kwargs)  # loftq_iters >= 1
  return last
