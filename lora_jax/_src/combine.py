"""One adapter from several: every combination of PEFT's
``add_weighted_adapter`` (peft 0.21), with PEFT's delta weights.

Two families, as in PEFT:

- On the *updates* ``delta_W_i = s_i * a_i @ b_i``. ``"cat"``: ``a = [a_1 |
  ... | a_n]`` along the rank axis and ``b = [w_1 s_1 b_1 ; ... ; w_n s_n
  b_n]``, scale 1: ``a @ b`` is the weighted sum exactly, at rank ``sum r_i``.
  ``"svd"``: the best rank-``rank`` approximation (Eckart-Young) of that sum,
  per batch entry of the kernel; from the factors alone when ``sum r_i <
  min(K, N)`` (QR of ``A = [a_i]`` and of ``B^T``, SVD of the small core
  ``R_A R_B^T``), otherwise from the dense sum. ``"ties_svd"``,
  ``"magnitude_prune_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``: the
  same rule as their factor-wise namesakes, applied to the dense updates
  (weights ``w_i``), then truncated by SVD.
- On the *factors*, ``a`` side and ``b`` side separately, equal ranks
  required: ``"linear"``, ``"ties"``, ``"magnitude_prune"``,
  ``"dare_linear"``, ``"dare_ties"``. Each ``w_i s_i`` is split as
  ``sign(w_i s_i) sqrt|w_i s_i|`` on ``a_i`` and ``sqrt|w_i s_i|`` on
  ``b_i``, so ``"linear"`` gives ``(sum c_i a_i) @ (sum d_i b_i)``, whose
  cross terms ``c_i d_j a_i @ b_j`` belong to no adapter (PEFT issue #3004).
  They are kept, to give PEFT's result; ``"cat"`` and ``"svd"`` have none.

The rules (``merge_utils``): ``magnitude_prune`` keeps the ``int(density *
numel)`` largest entries of each tensor; ``ties`` prunes so, elects each
entry's sign from the pruned, unweighted tensors (``"total"``: the sign of
their sum, ``>= 0`` counting as ``+``; ``"frequency"``: of the sum of signs)
and divides the weighted sum of the agreeing entries by their count (at
least 1); ``dare_*`` keeps each entry with probability ``density`` and
divides by ``density``. A tensor is one factor (or update) of one kernel:
for stacked kernels, one batch entry, as PEFT's modules are one per layer.

Where the result differs from PEFT 0.21's, on purpose: PEFT's ``"cat"``
puts ``w_i s_i`` on ``lora_A`` where lora_jax puts it on ``b`` (the same
update); PEFT turns every method into ``"linear"`` for a single adapter
(lora_jax does what was asked); with ``use_rslora`` PEFT's merged adapter is
scaled by ``sqrt(r)`` (its issue #3449; lora_jax's scale is 1); PEFT's
``svd_clamp`` is not offered.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import check_same_kernel
from lora_jax._src.delta import is_concrete
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.stack import refuse_stacks

_HIGHEST = jax.lax.Precision.HIGHEST
FACTORWISE = ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")
SVD = ("svd", "ties_svd", "magnitude_prune_svd", "dare_linear_svd",
       "dare_ties_svd")
METHODS = ("cat",) + FACTORWISE + SVD
PRUNED = ("ties", "magnitude_prune", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def _finite(x) -> bool:
  """Whether a concrete array is all finite (read now, also while tracing
  a caller: adapters closed over by a jitted function are concrete)."""
  with jax.ensure_compile_time_eval():
    return bool(jnp.isfinite(x).all())


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
  for k, w in enumerate(weights):
    if not math.isfinite(float(w)):
      raise ValueError(f"lj.combine: weights[{k}] is {w!r}; give finite "
                       f"weights.")
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
      if any(is_concrete(x) and not _finite(x) for x in (d.a, d.b)):
        raise ValueError(
            f"lj.combine: delta {k} at {path!r} has NaN or inf in its "
            f"factors; the combined adapter would be NaN, or (ties, "
            f"magnitude pruning) would silently drop those entries. Fix or "
            f"leave out that adapter.")
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


@functools.partial(jax.jit, static_argnums=3)
def _top(p, s, qt, rank):
  """``P[:, :rank] sqrt(S)`` and ``sqrt(S) Qt[:rank]`` (zero directions past
  the available rank), the dropped and the total singular mass."""
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
  return new_a, new_b, dropped, energy


def _truncate(p, s, qt, rank, first, dtype):
  """The rank-``rank`` adapter ``P S Qt`` truncated, and the fraction of
  singular mass it drops."""
  new_a, new_b, dropped, energy = _top(p, s, qt, rank)
  fraction = float(dropped / energy) if float(energy) > 0 else 0.0
  new_a, new_b = first.layout.unflatten_factors(
      new_a.astype(dtype), new_b.astype(dtype), first.kernel_shape)
  return LoraDelta(new_a, new_b, scale=1.0, layout=first.layout,
                   dropout=first.dropout), fraction


def _svd(ds, weights, rank):
  a, b = _stacked_factors(ds, weights)
  _, k, total = a.shape
  n = b.shape[-1]
  p, s, qt = (_core_svd if total < min(k, n) else _dense_svd)(a, b)
  return _truncate(p, s, qt, rank, ds[0], a.dtype)


def _dtypes(ds):
  """The factors' common dtype and the (at least float32) one to compute in."""
  dtype = jnp.result_type(*(d.a.dtype for d in ds), *(d.b.dtype for d in ds))
  return dtype, jnp.promote_types(dtype, jnp.float32)


def _magnitude_prune(x, density):
  """Each ``x[i, g]`` with all but its ``int(density * M)`` largest entries
  (by magnitude) zeroed; ``x`` is ``(n, G, M)``."""
  if density >= 1:
    return x
  k = int(density * x.shape[-1])
  if k == 0:
    return jnp.zeros_like(x)
  _, top = jax.lax.top_k(jnp.abs(x), k)
  keep = jnp.put_along_axis(jnp.zeros(x.shape, bool), top, True, axis=-1,
                            inplace=False)
  return jnp.where(keep, x, 0)


def _random_prune(x, density, key):
  """DARE: each entry kept with probability ``density``, divided by it."""
  if density >= 1:
    return x
  keep = jax.random.bernoulli(key, density, x.shape)
  return jnp.where(keep, x / density, 0)


def _merge(rule, x, w, density, sign_method, key):
  """PEFT's ``merge_utils`` rule over the first axis of ``x (n, G, M)`` with
  weights ``w (n,)``: ``(G, M)``."""
  if rule in ("ties", "magnitude_prune"):
    x = _magnitude_prune(x, density)
  elif rule in ("dare_linear", "dare_ties"):
    x = _random_prune(x, density, key)
  weighted = x * w.astype(x.dtype)[:, None, None]
  if rule not in ("ties", "dare_ties"):
    return weighted.sum(0)
  sign = jnp.sign(x)
  votes = x.sum(0) if sign_method == "total" else sign.sum(0)
  agree = sign == jnp.where(votes >= 0, 1, -1).astype(x.dtype)
  count = jnp.maximum(agree.sum(0), 1).astype(x.dtype)
  return jnp.where(agree, weighted, 0).sum(0) / count


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _merge_factors(rule, density, sign_method, a, b, wa, wb, key):
  """The rule on ``a (n, G, K, R)`` with weights ``wa`` and on ``b (n, G, R,
  N)`` with ``wb``, each factor its own mask."""
  keys = (None, None) if key is None else jax.random.split(key)
  new_a = _merge(rule, a.reshape(*a.shape[:2], -1), wa, density,
                 sign_method, keys[0]).reshape(a.shape[1:])
  new_b = _merge(rule, b.reshape(*b.shape[:2], -1), wb, density,
                 sign_method, keys[1]).reshape(b.shape[1:])
  return new_a, new_b


def _factorwise(rule, ds, weights, density, sign_method, key):
  """``linear`` / ``ties`` / ``magnitude_prune`` / ``dare_*`` on the ``a``
  side and the ``b`` side separately, ``w s`` split as PEFT splits it."""
  dtype, work = _dtypes(ds)
  ws = [float(w) * float(d.scale) for d, w in zip(ds, weights)]
  root = jnp.asarray([abs(v) ** 0.5 for v in ws], work)
  sign = jnp.asarray([1.0 if v >= 0 else -1.0 for v in ws], work)
  flat = [d.layout.flatten_factors(d.a, d.b) for d in ds]
  a = jnp.stack([f[0] for f in flat]).astype(work)  # (n, G, K, R)
  b = jnp.stack([f[1] for f in flat]).astype(work)  # (n, G, R, N)
  new_a, new_b = _merge_factors(rule, density, sign_method, a, b,
                                sign * root, root, key)
  first = ds[0]
  new_a, new_b = first.layout.unflatten_factors(
      new_a.astype(dtype), new_b.astype(dtype), first.kernel_shape)
  return LoraDelta(new_a, new_b, scale=1.0, layout=first.layout,
                   dropout=first.dropout), 0.0


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _merge_updates(rule, density, sign_method, a, b, scales, w, key):
  """The SVD of the rule applied to the updates ``scales[i] a[i] @ b[i]``
  (``a (n, G, K, R)``, ``b (n, G, R, N)``) with weights ``w``."""
  x = jnp.matmul(a, b, precision=_HIGHEST) * scales[:, None, None, None]
  merged = _merge(rule, x.reshape(*x.shape[:2], -1), w, density,
                  sign_method, key).reshape(x.shape[1:])
  return jnp.linalg.svd(merged, full_matrices=False)


def _dense_merge_svd(rule, ds, weights, rank, density, sign_method, key):
  """``*_svd``: the rule on the dense updates ``s_i a_i @ b_i`` (weights
  ``w_i``), truncated to rank ``rank`` by SVD."""
  dtype, work = _dtypes(ds)
  flat = [d.layout.flatten_factors(d.a, d.b) for d in ds]
  if len({f[0].shape for f in flat}) > 1:  # ranks differ: pad with zeros
    top = max(f[0].shape[-1] for f in flat)
    flat = [(jnp.pad(a, ((0, 0), (0, 0), (0, top - a.shape[-1]))),
             jnp.pad(b, ((0, 0), (0, top - b.shape[-2]), (0, 0))))
            for a, b in flat]
  a = jnp.stack([f[0] for f in flat]).astype(work)
  b = jnp.stack([f[1] for f in flat]).astype(work)
  p, s, qt = _merge_updates(
      rule, density, sign_method, a, b,
      jnp.asarray([float(d.scale) for d in ds], work),
      jnp.asarray([float(w) for w in weights], work), key)
  return _truncate(p, s, qt, rank, ds[0], dtype)


def _check_method(method, rank, density, sign_method, key) -> None:
  """Raises naming the argument unless it fits ``method``."""
  if method not in METHODS:
    raise ValueError(f"lj.combine: method={method!r}; choose one of "
                     f"{METHODS}.")
  if rank is not None and method not in SVD:
    raise ValueError(
        f"lj.combine: rank={rank} is for the SVD methods {SVD}; "
        + ("'cat' is exact and its rank is the sum of the ranks." if method
           == "cat" else f"{method!r} keeps the adapters' (equal) rank."))
  rule = method.removesuffix("_svd")
  if rule in PRUNED:
    if density is None:
      raise ValueError(f"lj.combine: method={method!r} needs density, the "
                       f"fraction of entries kept (0 < density <= 1).")
    dare = rule.startswith("dare")
    number = (float(density) if isinstance(density, numbers.Real)
              and not isinstance(density, bool) else math.nan)
    if not (0 < number <= 1 if dare else 0 <= number <= 1):
      raise ValueError(
          f"lj.combine: density={density!r}; give the fraction of entries "
          f"kept, in " + ("(0, 1] (DARE divides by it)." if dare else
                          "[0, 1]."))
  elif density is not None:
    raise ValueError(f"lj.combine: density={density!r} is for the pruning "
                     f"methods; {method!r} prunes nothing.")
  if sign_method not in SIGN_METHODS:
    raise ValueError(f"lj.combine: majority_sign_method={sign_method!r}; "
                     f"choose one of {SIGN_METHODS}.")
  if rule.startswith("dare"):
    if key is None:
      raise ValueError(f"lj.combine: method={method!r} drops entries at "
                       f"random; give key=jax.random.key(...).")
  elif key is not None:
    raise ValueError(f"lj.combine: key is for the DARE methods; {method!r} "
                     f"is deterministic.")


def _check_ranks(method, path, ds) -> None:
  ranks = [d.rank for d in ds]
  others = ["cat", "svd"] + ([] if method == "linear" else [method + "_svd"])
  if len(set(ranks)) > 1:
    k = next(i for i, r in enumerate(ranks) if r != ranks[0])
    raise ValueError(
        f"lj.combine: method={method!r} adds the factors entry by entry and "
        f"needs equal ranks (as PEFT's add_weighted_adapter); at {path!r} "
        f"delta 0 has rank {ranks[0]} and delta {k} rank {ranks[k]}. Use "
        f"{' or '.join(repr(m) for m in others)}, which combine the "
        f"updates.")


def _refuse_other_leaves(delta: Any, k: int) -> None:
  """combine merges LoRA adapters only: a trainable token table or a trained
  array in a delta has no merge rule, and keeping delta 0's would drop the
  others' silently."""
  def check(path, x):
    if x is not None and not isinstance(x, LoraDelta):
      raise ValueError(
          f"lj.combine: delta {k} holds a {type(x).__name__} at {path!r}; only "
          f"LoRA adapters (LoraDelta) have a combination rule. Remove it from "
          f"every delta before combining (e.g. set that path to None) and "
          f"decide its value yourself.")
    return x
  map_with_paths(check, delta, is_leaf=is_delta_or_none)


def combine(deltas: Sequence[Any], weights: Sequence[float] | None = None,
            method: str = "cat", rank: int | None = None,
            density: float | None = None, majority_sign_method: str = "total",
            key: Any = None, *, return_info: bool = False) -> Any:
  """One adapter from several, by any of PEFT's ``add_weighted_adapter``
  combination types, with PEFT's delta weights.

  With ``delta_W_i = s_i * a_i @ b_i`` (``s_i`` the adapter's scale) and
  ``w_i = weights[i]``:

  - ``"cat"`` (exact): ``sum_i w_i delta_W_i``, the factors concatenated
    along the rank axis (rank ``sum r_i``).
  - ``"svd"``: the best rank-``rank`` approximation of that sum (per batch
    entry of a stacked kernel), computed from the factors without forming
    the ``K x N`` update when the summed rank is below both sides.
  - ``"ties_svd"``, ``"magnitude_prune_svd"``, ``"dare_linear_svd"``,
    ``"dare_ties_svd"``: TIES / magnitude pruning / DARE on the dense
    updates ``delta_W_i`` with weights ``w_i``, truncated to rank ``rank``.
  - ``"linear"``, ``"ties"``, ``"magnitude_prune"``, ``"dare_linear"``,
    ``"dare_ties"``: the same rules on the factors, the ``a_i`` with weights
    ``sign(w_i s_i) sqrt|w_i s_i|`` and the ``b_i`` with ``sqrt|w_i s_i|``
    (equal ranks required; the result has that rank). Their product has
    cross terms ``a_i @ b_j`` that belong to no adapter (PEFT issue #3004):
    ``"linear"`` of two adapters is not their sum, which ``"cat"`` is. They
    are here to reproduce PEFT's merges.

  Pruning (module docstring): ``magnitude_prune`` keeps each tensor's
  ``int(density * numel)`` largest entries; ``ties`` prunes so, then keeps
  the entries whose sign agrees with the elected one
  (``majority_sign_method``) and divides their weighted sum by their count;
  ``dare_*`` keeps each entry with probability ``density`` (from ``key``)
  and divides by ``density``. ``density=1`` prunes nothing, as in PEFT.

  The result has scale 1 (PEFT's ``lora_alpha = r``; with ``use_rslora``
  PEFT 0.21's merged adapter is scaled by ``sqrt(r)`` instead, its issue
  #3449). Where PEFT turns every method into ``"linear"`` for a single
  adapter, lora_jax does what ``method`` says. DoRA adapters are refused:
  their update is not linear. Call it outside ``jit`` (it reads the
  discarded mass back as Python floats).

  Args:
    deltas: delta trees of one model adapting the same paths (from
      :func:`lora_jax.split`, :func:`lora_jax.load` or
      ``[lj.select(stacked, k) for k in ...]``); ranks and scales may differ.
    weights: one number per delta; default all 1.
    method: one of the names above.
    rank: the rank of an SVD method's result; default the largest input
      rank. Must be None for the others.
    density: the fraction of entries kept, for the ``ties``,
      ``magnitude_prune`` and ``dare`` methods (required there, None
      elsewhere); in ``[0, 1]``, ``(0, 1]`` for DARE.
    majority_sign_method: ``"total"`` (the sign of the sum of the pruned
      tensors) or ``"frequency"`` (of the sum of their signs), for ``ties``.
    key: a ``jax.random`` key, required by the DARE methods (and refused by
      the others); each path and factor draws its own mask from it.
    return_info: also return ``{path: discarded fraction}``: for the SVD
      methods ``sum of dropped sigma^2 / sum of all sigma^2`` of the path's
      merged update, 0.0 for the others.

  Returns:
    The first delta's structure with the combined :class:`LoraDelta`
    (scale 1.0) at each path; with ``return_info``, ``(delta, info)``.

  Raises:
    ValueError: naming the path or argument: deltas adapting other paths or
      kernels, DoRA or principal-init adapters, a rank mismatch for a
      factor-wise method, a missing or misplaced ``rank``, ``density`` or
      ``key``, an unknown method, a leaf other than a LoraDelta (trainable
      token rows, a trained array).

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
  >>> e = {"w": lj.LoraDelta(jnp.eye(4)[:, :1], jnp.eye(3)[:1])}
  >>> f = {"w": lj.LoraDelta(jnp.eye(4)[:, 1:2], jnp.eye(3)[1:2])}
  >>> lj.combine([e, f], method="linear")["w"].weight()[:2]  # cross terms
  Array([[1., 1., 0.],
         [1., 1., 0.]], dtype=float32)
  """
  _check_method(method, rank, density, majority_sign_method, key)
  if density is not None:
    density = float(density)  # a static argument of the jitted rules
  deltas = list(deltas)
  if not deltas:
    raise ValueError("lj.combine needs at least one delta.")
  for k, d in enumerate(deltas):
    refuse_stacks(d, f"lj.combine (delta {k})", "Combine its adapters: "
                  "lj.combine([lj.select(stacked, k) for k in range(n)], "
                  "weights).")
  for k, d in enumerate(deltas):
    _refuse_other_leaves(d, k)
  flat = [adapters(d) for d in deltas]
  weights = [1.0] * len(deltas) if weights is None else list(weights)
  _check(flat, weights)
  if method in FACTORWISE:
    for path in flat[0]:
      _check_ranks(method, path, [f[path] for f in flat])
  if rank is None:
    rank = max(d.rank for f in flat for d in f.values())
  if int(rank) < 1:
    raise ValueError(f"lj.combine: rank={rank}; give a positive rank.")
  rule = method.removesuffix("_svd")
  combined, info = {}, {}
  for n, path in enumerate(flat[0]):
    ds = [f[path] for f in flat]
    path_key = None if key is None else jax.random.fold_in(key, n)
    if method == "cat":
      combined[path], info[path] = _cat(ds, weights)
    elif method == "svd":
      combined[path], info[path] = _svd(ds, weights, int(rank))
    elif method in FACTORWISE:
      combined[path], info[path] = _factorwise(
          rule, ds, weights, density, majority_sign_method, path_key)
    else:
      combined[path], info[path] = _dense_merge_svd(
          rule, ds, weights, int(rank), density, majority_sign_method,
          path_key)
  out = map_with_paths(lambda p, d: combined[p] if isinstance(d, LoraDelta)
                       else d, deltas[0], is_leaf=is_delta_or_none)
  return (out, info) if return_info else out
