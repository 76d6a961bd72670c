"""One adapter from several: ``sum_i w_i * delta_W_i``, exactly or truncated.

Both methods combine the *updates* ``delta_W_i = s_i * a_i @ b_i``, never the
factors one by one: averaging the ``a_i`` and the ``b_i`` separately (PEFT's
``"linear"``) gives ``(sum w_i a_i) @ (sum w_i b_i)``, whose cross terms
``w_i w_j a_i @ b_j`` belong to no adapter.

- ``"cat"``: ``a = [a_1 | ... | a_n]`` along the rank axis and ``b = [w_1 s_1
  b_1 ; ... ; w_n s_n b_n]``, scale 1: ``a @ b`` is the weighted sum exactly,
  at rank ``sum r_i``.
- ``"svd"``: the best rank-``rank`` approximation (Eckart-Young) of that sum,
  per batch entry of the kernel. From the factors alone when ``sum r_i <
  min(K, N)``: QR of ``A = [a_i]`` and of ``B^T``, SVD of the small core
  ``R_A R_B^T``; otherwise from the dense sum. Returns what it discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import check_same_kernel
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.stack import refuse_stacks

_HIGHEST = jax.lax.Precision.HIGHEST
METHODS = ("cat", "svd")


def _check(deltas: list[dict[str, LoraDelta]], weights: list[float]):
  """Raises naming the path unless the adapters can be summed."""
  paths = list(deltas[0])
  if not paths:
    raise ValueError("lj.combine: the first delta holds no adapter.")
  for k, f in enumerate(deltas[1:], 1):
    if sorted(f) != sorted(paths):
      raise ValueError(
          f"lj.combine: delta {k} adapts {preview(f)} but delta 0 adapts "
          f"{preview(paths)}; combined adapters must adapt the same paths "
          f"(of one model).")
  if len(weights) != len(deltas):
    raise ValueError(f"lj.combine: {len(deltas)} deltas but {len(weights)} "
                     f"weights; give one weight per delta.")
  for path in paths:
    first = deltas[0][path]
    for k, f in enumerate(deltas):
      d = f[path]
      check_same_kernel("lj.combine", "delta", k, path, d, first,
                        "Only updates of the same kernel add up.")
      if d.magnitude is not None:
        raise ValueError(
            f"lj.combine: delta {k} at {path!r} is DoRA. A DoRA update "
            f"rescales the merged weight per column, so it is not linear in "
            f"the factors and DoRA adapters do not sum; merge each with "
            f"lj.merge instead.")
      if d.residual_of is not None:
        raise ValueError(
            f"lj.combine: delta {k} at {path!r} was made with "
            f"init={d.residual_of.init!r} and belongs with its own residual "
            f"base; convert it with lj.to_plain_lora first.")
      if d.dropout != first.dropout:
        raise ValueError(
            f"lj.combine: at {path!r} delta {k} has dropout {d.dropout:g}, "
            f"delta 0 {first.dropout:g}; give them one dropout "
            f"(d.replace(dropout=...)).")


def _stacked_factors(ds: Sequence[LoraDelta], weights: Sequence[float]):
  """``A (G, K, R)`` and ``B (G, R, N)`` with ``A @ B = sum w_i delta_W_i``
  per batch entry (``R = sum r_i``), in the factors' common dtype."""
  dtype = jnp.result_type(*(d.a.dtype for d in ds), *(d.b.dtype for d in ds))
  a_parts, b_parts = [], []
  for d, w in zip(ds, weights):
    a, b = d.layout.flatten_factors(d.a, d.b)
    a_parts.append(a.astype(dtype))
    b_parts.append((b * (float(w) * float(d.scale))).astype(dtype))
  return jnp.concatenate(a_parts, -1), jnp.concatenate(b_parts, -2)


def _cat(ds, weights):
  a, b = _stacked_factors(ds, weights)
  first = ds[0]
  a, b = first.layout.unflatten_factors(a, b, first.kernel_shape)
  return LoraDelta(a, b, scale=1.0, layout=first.layout,
                   dropout=first.dropout), 0.0


def _core_svd(a, b):
  """``(P, S, Qt)`` with ``a @ b = P diag(S) Qt`` per batch entry, from the
  factors: ``a = Qa Ra``, ``b^T = Qb Rb``, SVD of ``Ra Rb^T``. Used when the
  rank is below both sides, so nothing of size ``K x N`` is formed."""
  qa, ra = jnp.linalg.qr(a.astype(jnp.float32))
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2).astype(jnp.float32))
  core = jnp.matmul(ra, jnp.swapaxes(rb, -1, -2), precision=_HIGHEST)
  u, s, vt = jnp.linalg.svd(core, full_matrices=False)
  p = jnp.matmul(qa, u, precision=_HIGHEST)
  qt = jnp.matmul(vt, jnp.swapaxes(qb, -1, -2), precision=_HIGHEST)
  return p, s, qt


def _dense_svd(a, b):
  w = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                 precision=_HIGHEST)
  return jnp.linalg.svd(w, full_matrices=False)


def _svd(ds, weights, rank):
  a, b = _stacked_factors(ds, weights)
  _, k, total = a.shape
  n = b.shape[-1]
  p, s, qt = (_core_svd if total < min(k, n) else _dense_svd)(a, b)
  keep = min(rank, s.shape[-1])
  # sqrt(S) on each side: factors of like size, as a fresh LoRA would have
  root = jnp.sqrt(s[:, :keep])
  new_a = p[:, :, :keep] * root[:, None, :]
  new_b = qt[:, :keep, :] * root[:, :, None]
  if keep < rank:  # fewer singular values than asked for: zero directions
    new_a = jnp.pad(new_a, ((0, 0), (0, 0), (0, rank - keep)))
    new_b = jnp.pad(new_b, ((0, 0), (0, rank - keep), (0, 0)))
  energy = jnp.sum(s.astype(jnp.float32) ** 2)
  dropped = jnp.sum(s[:, keep:].astype(jnp.float32) ** 2)
  fraction = float(dropped / energy) if float(energy) > 0 else 0.0
  first = ds[0]
  new_a, new_b = first.layout.unflatten_factors(
      new_a.astype(a.dtype), new_b.astype(b.dtype), first.kernel_shape)
  return LoraDelta(new_a, new_b, scale=1.0, layout=first.layout,
                   dropout=first.dropout), fraction


def combine(deltas: Sequence[Any], weights: Sequence[float] | None = None,
            method: str = "cat", rank: int | None = None, *,
            return_info: bool = False) -> Any:
  """One adapter whose update is ``sum_i weights[i] * delta_W_i``.

  ``"cat"`` is exact: the factors are concatenated along the rank axis (each
  ``b_i`` times ``weights[i] * scale_i``, scale 1), so the rank is the sum of
  the ranks. ``"svd"`` keeps the best rank-``rank`` approximation of the same
  sum (per batch entry for stacked kernels), computed from the factors
  without forming the ``K x N`` update when the summed rank is below both
  sides; ``return_info=True`` also returns the fraction of the squared
  Frobenius norm (singular mass) it discarded, per path. Unlike PEFT's
  ``"linear"``, neither method mixes one adapter's ``a`` with another's
  ``b``. DoRA adapters are refused: their update is not linear. Call it
  outside ``jit`` (it reads the discarded mass back as Python floats).

  Args:
    deltas: delta trees of one model adapting the same paths (from
      :func:`lora_jax.split`, :func:`lora_jax.load` or
      ``[lj.select(stacked, k) for k in ...]``); ranks and scales may differ.
    weights: one number per delta; default all 1.
    method: ``"cat"`` (exact) or ``"svd"`` (truncated).
    rank: the rank of the ``"svd"`` result; default the largest input rank.
      Must be None for ``"cat"``.
    return_info: also return ``{path: discarded fraction}`` (0.0 for
      ``"cat"``; for ``"svd"`` ``sum of dropped sigma^2 / sum of all
      sigma^2`` of the path's summed update).

  Returns:
    The first delta's structure with the combined :class:`LoraDelta`
    (scale 1.0) at each path; with ``return_info``, ``(delta, info)``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> d1 = {"w": lj.LoraDelta(jnp.ones((4, 1)), jnp.ones((1, 3)), scale=2.0)}
  >>> d2 = {"w": lj.LoraDelta(jnp.eye(4)[:, :2], jnp.eye(3)[:2])}
  >>> both = lj.combine([d1, d2], [0.5, 1.0])
  >>> both["w"].rank, bool(jnp.allclose(both["w"].weight(),
  ...     0.5 * d1["w"].weight() + d2["w"].weight()))
  (3, True)
  >>> low, info = lj.combine([d1, d2], [0.5, 1.0], "svd", rank=1,
  ...                        return_info=True)
  >>> low["w"].rank, round(info["w"], 3)
  (1, 0.062)
  """
  if method not in METHODS:
    raise ValueError(f"lj.combine: method={method!r}; choose one of "
                     f"{METHODS}.")
  deltas = list(deltas)
  if not deltas:
    raise ValueError("lj.combine needs at least one delta.")
  for k, d in enumerate(deltas):
    refuse_stacks(d, f"lj.combine (delta {k})", "Combine its adapters: "
                  "lj.combine([lj.select(stacked, k) for k in range(n)], "
                  "weights).")
  flat = [adapters(d) for d in deltas]
  weights = [1.0] * len(deltas) if weights is None else list(weights)
  _check(flat, weights)
  if method == "cat" and rank is not None:
    raise ValueError(f"lj.combine: rank={rank} is for method='svd'; 'cat' is "
                     f"exact and its rank is the sum of the ranks.")
  if rank is None:
    rank = max(d.rank for f in flat for d in f.values())
  if int(rank) < 1:
    raise ValueError(f"lj.combine: rank={rank}; give a positive rank.")
  combined, info = {}, {}
  for path in flat[0]:
    ds = [f[path] for f in flat]
    if method == "cat":
      combined[path], info[path] = _cat(ds, weights)
    else:
      combined[path], info[path] = _svd(ds, weights, int(rank))
  out = map_with_paths(lambda p, d: combined[p] if isinstance(d, LoraDelta)
                       else d, deltas[0], is_leaf=is_delta_or_none)
  return (out, info) if return_info else out
