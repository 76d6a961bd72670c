"""EVA (Explained Variance Adaptation): data-driven ``a`` and ranks.

PEFT's ``init_lora_weights="eva"`` (Paulus et al. 2024): each adapted
kernel's ``a`` becomes the top principal directions of the kernel's input
activations over some batches, and the ranks are redistributed across
kernels by the variance those directions explain: every kernel offers its
top ``round(rank * rho)`` directions, the ``sum(rank)`` directions with the
largest explained-variance ratios (over all kernels) are kept, and a kernel's
new rank is how many of its own were kept (a kernel left with none loses its
adapter). ``b`` stays zero, so the model is unchanged; the scale stays the
adapter's (PEFT's ``adjust_scaling_factors=True``).

Differences from PEFT's implementation, which the result does not depend on
up to floating point: the principal directions come from the exact
(centered) covariance of every activation row of every batch, accumulated in
float64, instead of PEFT's incremental PCA stopped when the directions stop
moving (``tau``); every batch is used once.

Differences that change the result: every row counts, where PEFT's default
``use_label_mask=True`` drops the rows whose label is ``-100`` (padding,
prompts): pass batches without padding rows for PEFT's directions. With
rsLoRA PEFT's ``adjust_scaling_factors`` scales ``alpha`` by ``k / r``, so
its scale becomes ``alpha * sqrt(k) / r`` for a new rank ``k``; lora_jax
keeps the adapter's scale (the same as PEFT's without rsLoRA).

The activations are read where the factored engine computes each adapter's
branch (the same ``x`` the branch multiplies by ``a``), so every use of a
kernel the engine factors is seen, inside ``scan``, ``remat`` and ``jit``
too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.factored.interpreter import _stand_ins
from lora_jax._src.factored.interpreter import evaluate
from lora_jax._src.factored.values import Context
from lora_jax._src.factored.values import Lora
from lora_jax._src.factored.values import Report
from lora_jax._src.merge import check_matches
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.quant import QArray
from lora_jax._src.stack import refuse_stacks
from lora_jax._src.tokens import token_deltas


class _Moments:
  """Row count, sum and sum of outer products of one kernel's inputs."""

  def __init__(self, k: int):
    self.n = 0
    self.total = np.zeros(k)
    self.outer = np.zeros((k, k))

  def add(self, rows: np.ndarray) -> None:
    rows = np.asarray(rows, np.float64)
    self.n += rows.shape[0]
    self.total += rows.sum(0)
    self.outer += rows.T @ rows

  def pca(self) -> tuple[np.ndarray, np.ndarray]:
    """``(variances, directions)``: the centered covariance's eigenvalues,
    descending, and its eigenvectors as columns."""
    mean = self.total / self.n
    cov = (self.outer - self.n * np.outer(mean, mean)) / max(self.n - 1, 1)
    values, vectors = np.linalg.eigh(cov)
    return np.clip(values[::-1], 0.0, None), vectors[:, ::-1]


@dataclasses.dataclass(frozen=True)
class _TapContext(Context):
  """The engine's context, reporting each adapter's branch input ``x`` to
  ``tap(path, rows)`` through a host callback, ``rows`` being ``x`` with its
  contracted axis last. The engine asks ``choose(x_shape, x_contract,
  lora)`` (``mode="auto"``'s question, answered "factored") just before it
  computes a matmul's branch: that is where the contracted axis is read."""
  tap: Callable | None = None
  contracted: dict = dataclasses.field(default_factory=dict)

  def dropout(self, x, lora: Lora):
    if self.tap is not None and x is not None and lora.path in self.contracted:
      axes = self.contracted.pop(lora.path)
      if len(axes) != 1:
        raise ValueError(
            f"eva_init: {lora.path!r} is contracted with its input over "
            f"{len(axes)} axes; EVA supports kernels used as x @ W with one "
            f"input axis (PEFT's Linear layers). Exclude it from targets.")
      ins = math.prod(lora.layout.sizes(tuple(lora.w.shape))[1])
      if x.shape[axes[0]] != ins:
        raise ValueError(_transposed(lora.path))
      jax.debug.callback(self.tap, lora.path, jnp.moveaxis(x, axes[0], -1))
    elif self.tap is not None and x is not None:
      raise ValueError(
          f"eva_init: {lora.path!r} is used by an op other than a matmul "
          f"(a convolution, a grouped matmul); EVA supports kernels used as "
          f"x @ W (PEFT's Linear layers). Exclude it from targets.")
    return super().dropout(x, lora)

  def record(self, x_shape, x_contract, lora) -> str:
    del x_shape
    self.contracted[lora.path] = tuple(x_contract)
    return "factored"


def _transposed(path: str) -> str:
  return (f"eva_init: {path!r} is used transposed (h @ W.T, e.g. a tied "
          f"output head): there the input is contracted with the kernel's "
          f"outputs, and its directions are not the inputs that a "
          f"multiplies. EVA supports kernels used as x @ W (PEFT's Linear "
          f"layers). Exclude it from targets.")


def _collect(fn: Callable, base: Any, delta: Any, deltas: dict,
             batches: Iterable, moments: dict[str, _Moments]) -> None:
  """Runs ``fn`` on every batch in the factored engine, adding each adapted
  kernel's input rows to ``moments``."""
  ins = {p: math.prod(d.layout.sizes(d.kernel_shape)[1])
         for p, d in deltas.items()}
  seen: set = set()

  def tap(path, x):
    path = str(path)
    if path not in moments:  # trainable tokens: part of the model, not EVA's
      return
    x = np.asarray(x)
    if x.size % ins[path]:
      raise ValueError(
          f"eva_init: an input of {path!r} has shape {x.shape}, whose "
          f"trailing axes are not the kernel's {ins[path]} inputs.")
    moments[path].add(x.reshape(-1, ins[path]))
    seen.add(path)

  # trainable tokens run as the factored engine runs them, so the
  # activations are the model's
  flat = dict(leaves_with_paths(base))
  carried = {**deltas, **{p: t.as_lora(flat[p], p)
                          for p, t in token_deltas(delta).items()}}

  def run(b, args, kwargs):
    stand_in = _stand_ins(b)
    closed, inputs, out_tree = jc.trace(fn, stand_in, args, kwargs)
    ctx = _TapContext(strict=False, report=report, tap=tap)
    ctx = dataclasses.replace(ctx, choose=ctx.record)
    for i, (path, leaf) in enumerate(leaves_with_paths(b)):
      d = carried.get(path)
      if d is not None:
        inputs[i] = Lora(leaf, d.a, d.b, d.scale, d.layout, path)
      elif isinstance(leaf, QArray):
        inputs[i] = leaf.dequantize()
    outs = evaluate(jc.Program(closed.jaxpr, tuple(closed.consts)), inputs,
                    ctx)
    return jax.tree.unflatten(out_tree, outs)

  report = Report()
  count = 0
  for batch in batches:
    args = batch if isinstance(batch, tuple) else (batch,)
    jax.block_until_ready(run(base, args, {}))
    jax.effects_barrier()
    count += 1
  if not count:
    raise ValueError("eva_init: batches is empty; pass at least one batch.")
  # a square kernel used transposed passes the size check in the context
  transposed = [p for p in deltas if any(
      "transposed" in r for r in report.rules.get(p, ()))]
  if transposed:
    raise ValueError(_transposed(transposed[0]))
  merged = sorted({p for p, _ in report.fallbacks if p in deltas})
  if merged:
    raise ValueError(
        f"eva_init: the engine merges {preview(merged)} for some use (no "
        f"factored rule; see lora_jax.explain), where their inputs cannot be "
        f"read. Exclude them from targets.")
  missing = [p for p in deltas if p not in seen]
  if missing:
    raise ValueError(
        f"eva_init: no input of {preview(missing)} was seen: the engine "
        f"merges them (no factored rule for their use; see "
        f"lora_jax.explain) or the function does not use them. Exclude them "
        f"from the config's targets.")


def eva_init(base: Any, delta: Any, apply_fn: Callable[..., Any],
             batches: Iterable[Any], rho: float = 2.0, whiten: bool = False
             ) -> Any:
  """EVA: ``a`` from the principal directions of each adapted kernel's
  inputs over ``batches``, ranks redistributed by explained variance.

  For each adapter (``delta`` from :func:`lora_jax.split`, ranks ``r_i``),
  the inputs ``x`` of its kernel (its contracted axes, every row of every
  batch, every use) give a centered covariance; its eigenvectors are the
  principal directions and its eigenvalues over their sum the
  explained-variance ratios. Each kernel offers its top ``round(r_i * rho)``
  directions; the ``sum(r_i)`` with the largest ratios overall are kept
  (ties: the kernel that comes first); a kernel's new rank ``k`` is how many
  of its own were kept, ``a`` its top ``k`` directions (divided by the
  square roots of their singular values with ``whiten``), ``b`` zeros, the
  scale unchanged (PEFT's ``adjust_scaling_factors``). A kernel with ``k =
  0`` loses its adapter (``None`` in the result). As PEFT's EVA.

  Args:
    base: the frozen base.
    delta: the delta from :func:`lora_jax.split` (no stacks; kernels
      without batch axes: a scanned stack's layers would share statistics).
    apply_fn: ``apply_fn(params, *args)``, the model.
    batches: an iterable of batches: each an array (one argument) or a
      tuple of arguments.
    rho: how many directions each kernel offers, relative to its rank
      (PEFT's ``rho``, >= 1).
    whiten: divide each direction by the square root of its singular value.

  Returns:
    The new delta.

  Raises:
    ValueError: stacks, batch axes, ``rho < 1``, no batches, or a kernel
      whose inputs the engine does not see (it merges that use).

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  >>> params = {"w1": jnp.eye(8), "w2": jnp.eye(8)}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="w."),
  ...                        jax.random.key(0))
  >>> batches = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]
  >>> new = lj.eva_init(base, delta, f, batches, rho=2.0)
  >>> sum(d.rank for d in lj.adapters(new).values())   # the budget, redistributed
  4
  """
  refuse_stacks(delta, "eva_init", "Initialise single adapters.")
  if not (isinstance(rho, (int, float)) and rho >= 1):
    raise ValueError(f"eva_init: rho must be a number >= 1, got {rho!r}.")
  deltas = adapters(delta)
  check_matches(base, deltas, "eva_init", token_deltas(delta))
  for p, d in deltas.items():
    if d.layout.batch:
      raise ValueError(
          f"eva_init: {p!r} has batch axes {d.layout.batch} (stacked or "
          f"scanned layers, experts); their inputs would be pooled into one "
          f"set of directions. Exclude it from targets, or give each layer "
          f"its own kernel.")
  moments = {p: _Moments(math.prod(d.layout.sizes(d.kernel_shape)[1]))
             for p, d in deltas.items()}
  _collect(apply_fn, base, delta, deltas, batches, moments)
  bad = [p for p in deltas if not (np.isfinite(moments[p].outer).all()
                                   and np.isfinite(moments[p].total).all())]
  if bad:
    raise ValueError(
        f"eva_init: the inputs of {preview(bad)} hold NaN or +-inf (in the "
        f"batches, or made by the model); their principal directions are "
        f"undefined. Check the batches.")
  pcas = {p: moments[p].pca() for p in deltas}
  offers = []  # (-ratio, kernel order, component) for every offered one
  for order, (p, d) in enumerate(deltas.items()):
    variances, _ = pcas[p]
    total = variances.sum()
    offered = min(round(d.rank * rho), variances.shape[0])
    ratios = variances[:offered] / total if total > 0 else np.zeros(offered)
    offers += [(-float(r), order, j) for j, r in enumerate(ratios)]
  budget = sum(d.rank for d in deltas.values())
  kept = sorted(offers)[:budget]
  ranks = {p: 0 for p in deltas}
  order_path = list(deltas)
  for _, order, _ in kept:
    ranks[order_path[order]] += 1
  new: dict[str, LoraDelta | None] = {}
  for p, d in deltas.items():
    k = ranks[p]
    if k == 0:
      new[p] = None
      continue
    variances, vectors = pcas[p]
    directions = vectors[:, :k]                          # (in, k)
    if whiten:
      singular = np.sqrt(variances[:k] * max(moments[p].n - 1, 1))
      directions = directions / np.sqrt(np.where(singular > 0, singular, 1))
    a_flat = jnp.asarray(directions, d.a.dtype)[None]    # (1, in, k)
    b_flat = jnp.zeros((1, k, math.prod(d.layout.sizes(d.kernel_shape)[2])),
                       d.b.dtype)
    a, b = d.layout.unflatten_factors(a_flat, b_flat, d.kernel_shape)
    new[p] = d.replace(a=a, b=b)
  return map_with_paths(
      lambda p, x: new[p] if isinstance(x, LoraDelta) else x, delta,
      is_leaf=is_delta_or_none)
