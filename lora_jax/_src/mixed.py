"""Mixed-adapter batches: every row of a batch with its own adapter of a stack.

``lj.wrap(f)(base, stacked, *args, adapter_ids=ids)`` runs here (:func:`run`).
The factored and auto engines run the batch whole where the engine can
follow the rows through the program (:func:`whole_batch`); otherwise, and
always in the merge engine, the function runs once per row under
``jax.vmap`` (:func:`per_row`), each row on its own gathered factors; for
a batch on a mesh with Explicit axes, once per adapter on the whole batch
(:func:`per_adapter`).

How a batch runs is the caller's explicit choice (``rows``), one of
:data:`ROWS`:

* ``"auto"``: whole where possible, else ``vmap`` over rows with each row's
  gathered factors (what :func:`lora_jax.wrap` does);
* ``"gather"``: always ``vmap`` over rows, gathered factors;
* ``"one-hot"``: always ``vmap`` over rows; in the factored engine a stack
  without DoRA enters each row as a one-hot contraction over the whole stack
  (:meth:`LoraStack.row_of_all`). It multiplies every adapter's factors by
  the other rows' zero weights, so one non-finite adapter (a diverged
  tenant) turns every row NaN (``0 * inf``); gathered factors keep each row
  to its own adapter. Faster for small stacks known to be finite (1.16x
  merged inference against 1.2-1.3x on W1, ``benchmarks/mixed.py``).

The benchmarks and tests pass ``"gather"`` and ``"one-hot"`` to measure and
check the ``vmap`` forms (``lora_jax._src.wrap.wrap_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src import dora
from lora_jax._src import factored
from lora_jax._src import jaxpr_core as jc
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import describe_array
from lora_jax._src.delta import is_concrete
from lora_jax._src.jaxpr_core import is_array
from lora_jax._src.merge import check_matches
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.quant import QArray
from lora_jax._src.sharding import onto_mesh_of
from lora_jax._src.stack import LoraStack
from lora_jax._src.stack import check_stack_bases
from lora_jax._src.stack import is_stack_or_none
from lora_jax._src.stack import stacks

ROWS = ("auto", "gather", "one-hot")


def run(fn: Callable, single: Callable, base: Any, stacked: Any,
        adapter_ids: Any, args: tuple, kwargs: dict, lora_rng: Any, *,
        mode: str, rows: str, **options: Any) -> Any:
  """``fn`` on a batch whose row ``i`` uses adapter ``adapter_ids[i]`` of
  ``stacked``: ``single(base, delta, *args, lora_rng=, **kwargs)`` is the
  wrapped function of one adapter; ``options`` (strict, choose, recompute)
  go to the factored engine when the batch runs whole."""
  n = next(iter(stacks(stacked).values())).size
  ids = check_rows(adapter_ids, args, kwargs, n)
  check_stack_bases(base, stacked)  # PiSSA / OLoRA marks
  if mode != "merge" and rows == "auto":
    whole = whole_batch(fn, base, stacked, ids, args, kwargs, lora_rng,
                        **options)
    if whole is not None:
      return whole
  apply = lambda b, d, key, *a, **k: single(b, d, *a, lora_rng=key, **k)
  if ids.shape[0] == 1:  # one row: the function itself, on that adapter
    return apply(base, first_row(base, stacked, ids), lora_rng, *args,
                 **kwargs)
  out_axes, out_tree, whole_only = row_axes(fn, base, stacked, args, kwargs,
                                            ids.shape[0])
  if rows == "auto" and whole_only:
    return per_adapter(apply, base, stacked, ids, args, kwargs, out_axes,
                       out_tree, rng=lora_rng)
  return per_row(apply, base, stacked, ids, args, kwargs, out_axes, out_tree,
                 one_hot=mode != "merge" and rows == "one-hot", rng=lora_rng)


def check_rows(ids, args, kwargs, n: int) -> jax.Array:
  """``ids`` as an array, checked against the arguments' row axes and, when
  its values are known (not under ``jit``), against the stack's ``n``
  adapters."""
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"adapter_ids must be a 1-D integer array (one adapter "
                     f"per row, -1 for none); got {describe_array(ids)}.")
  if is_concrete(ids):
    bad = sorted({int(k) for k in ids.tolist() if not -1 <= k < n})
    if bad:
      raise ValueError(
          f"adapter_ids {bad[:8]} are outside [-1, {n}): the stack holds {n} "
          f"adapters (0..{n - 1}), and -1 runs a row on the base model. "
          f"Under jit, where ids cannot be checked, such rows come out NaN.")
  for x in jax.tree.leaves((args, kwargs)):
    if hasattr(x, "shape") and x.ndim and x.shape[0] != ids.shape[0]:
      raise ValueError(
          f"adapter_ids has {ids.shape[0]} rows but an argument has shape "
          f"{tuple(x.shape)}: every array argument's axis 0 is the row "
          f"axis.")
  return ids


def row_factors(stacked, ids) -> dict:
  """``{path: (a, b, scale, layout, dropout)}`` with row ``i`` holding
  adapter ``ids[i]``'s factors (:meth:`LoraStack.rows`): a mixed batch for
  the factored engine to run whole. Not for DoRA stacks."""
  return {p: (*s.rows(ids)[:3], s.layout, s.dropout)
          for p, s in stacks(stacked).items()}


def base_norms(base, stacked) -> dict:
  """``{path: ||W0||}`` (per output unit) for each DoRA stack's kernel: the
  magnitude of a row on the base model (id -1)."""
  out = {}
  for p, s in stacks(stacked).items():
    if s.magnitude is not None:
      w0 = dict(leaves_with_paths(base))[p]
      if isinstance(w0, QArray):
        w0 = w0.dequantize()
      zero = LoraDelta(jnp.zeros_like(s.a[0]), jnp.zeros_like(s.b[0]),
                       layout=s.layout)
      out[p] = dora.norm(w0, zero)
  return out


def per_row(apply, base, stacked, ids, args, kwargs, out_axes: list,
            out_tree, one_hot: bool = False, rng=None):
  """``apply(base, delta_i, rng_i, row_i(args), **kwargs)`` for every row
  ``i``, with ``delta_i`` adapter ``ids[i]`` of the stack (``-1``: none), in
  one batched pass (``jax.vmap`` over the rows: the base's matmuls are
  shared, each row's low-rank branch uses its own gathered factors).

  Rows must be independent (as in serving); array arguments are split along
  axis 0 (each row runs as a batch of one), everything else is passed whole.
  ``out_axes``: for each flat output, the axis holding the rows (the row
  runs with size 1 there, and the rows are stacked back along it), or None
  for an output that does not read the rows. ``rng``: LoRA dropout's key;
  row ``i`` draws its masks from ``fold_in(rng, i)``. ``one_hot`` (for the
  factored engine): a stack without DoRA enters as
  :meth:`LoraStack.row_of_all` (a one-hot contraction over every adapter),
  else as :meth:`LoraStack.row` (the row's own gathered factors).
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  rows = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and x.ndim]
  norms = base_norms(base, stacked)

  def one(row_leaves, index, position):
    full = list(leaves)
    for i, x in zip(rows, row_leaves):
      full[i] = x[None]
    a, k = jax.tree.unflatten(treedef, full)
    delta = row_delta(stacked, index, norms, one_hot)
    key = None if rng is None else jax.random.fold_in(rng, position)
    flat = jax.tree.leaves(apply(base, delta, key, *a, **k))
    return [y if r is None else jax.lax.index_in_dim(y, 0, r, keepdims=False)
            for y, r in zip(flat, out_axes)]
  row_leaves, ids, positions = _rows_alike(
      [leaves[i] for i in rows], ids, jnp.arange(ids.shape[0]))
  flat = jax.vmap(one, out_axes=list(out_axes))(row_leaves, ids, positions)
  return jax.tree.unflatten(out_tree, flat)


def _typed_rows(*trees, sharded: bool = False) -> Any:
  """The first array of ``trees`` with rows (axis 0) whose type names a
  mesh with Explicit axes, or None; with ``sharded``, the first whose rows
  are sharded by type (a batch on ``"data"``). Such a batch runs per
  adapter, as a program written for it may name the rows' sharding (an
  ``out_sharding=P("data", ...)``) that a row alone under ``vmap`` cannot
  have."""
  def typed(x) -> bool:
    if not (hasattr(x, "shape") and x.ndim):
      return False
    spec = jc.type_spec(x)
    return spec is not None and (not sharded or spec[0] is not None)
  return next((x for x in jax.tree.leaves(trees) if typed(x)), None)


def _rows_alike(row_leaves: list, ids, positions) -> tuple:
  """``(row_leaves, ids, positions)`` with axis 0 (the rows) sharded alike,
  as ``vmap`` over rows asks of its inputs under Explicit mesh axes: each
  as the first argument whose rows are sharded by type, other axes as they
  are. The values are unchanged; without Explicit axes, all is returned as
  given."""
  lead = _typed_rows(row_leaves, sharded=True)
  if lead is None:
    return row_leaves, ids, positions
  alike = lambda v: jc.align(v, lead, {0: 0})
  return [alike(x) for x in row_leaves], alike(ids), alike(positions)


def per_adapter(apply, base, stacked, ids, args, kwargs, out_axes: list,
                out_tree, rng=None):
  """What :func:`per_row` computes, by running the whole batch once on the
  base model and once per adapter, keeping each pass's rows of that
  adapter: for a batch on a mesh with Explicit axes, which ``vmap`` over
  rows cannot run when the program names the rows' sharding (an
  ``out_sharding=P("data", ...)``: inside ``vmap`` a row axis sharded on
  ``"data"`` holds it already, and a row alone cannot be split over it);
  and for a program holding a ``shard_map``, which may split the rows over
  devices.

  The function sees the batch as the caller gave it, one adapter at a
  time: ``n + 1`` passes under one ``lax.scan``. Rows whose ids are outside
  ``[-1, n)`` (possible only under ``jit``) come out NaN, as on every other
  path: floating outputs are set so; if an output is not floating, a first
  pass on an adapter outside the stack (NaN scale) gives those rows what a
  NaN adapter gives them, without a gradient. Rows must be independent, as
  for :func:`per_row`; LoRA dropout draws the masks a single-adapter batch
  would (``rng`` itself in every pass). Each pass reads only its adapter's
  rows (the others enter with no gradient, their non-finite entries 0), so
  a non-finite row or adapter changes no other row's outputs or gradients,
  nor another adapter's gradients.
  """
  n = next(iter(stacks(stacked).values())).size
  norms = base_norms(base, stacked)
  lead = _typed_rows(args, kwargs, sharded=True)
  lead = _typed_rows(args, kwargs) if lead is None else lead
  if lead is not None:  # the ids' masks live on the rows' mesh, sharded so
    ids = onto_mesh_of(ids, lead, (jc.type_spec(lead) or (None,))[:1])

  def one(k, own=True):
    # Pass k reads its own rows; the others enter finite (their NaN and
    # inf entries 0, finite ones as they are: a program need not be finite
    # at zero), and their gradients are cut (a select, not a product with a
    # zero mask): so a non-finite value in another adapter's row, or another
    # adapter non-finite, reaches neither this adapter's gradient nor those
    # rows'.
    a, kw = jax.tree.map(lambda x: _own_rows(x, ids == k), (args, kwargs)
                         ) if own else (args, kwargs)
    return jax.tree.leaves(apply(base, row_delta(stacked, k, norms), rng,
                                 *a, **kw))

  def keep(outs, k):
    return [o if r is None else jnp.where(_row_mask(ids == k, y, r), y, o)
            for y, o, r in zip(one(k), outs, out_axes)], None
  ks = jnp.arange(-1, n, dtype=ids.dtype)
  first = one(ks[0])  # the base model's pass
  if all(r is None or jnp.issubdtype(y.dtype, jnp.inexact)
         for y, r in zip(first, out_axes)):  # bad ids set to NaN after
    flat = _over(keep, first, ks[1:])
    valid = (ids >= -1) & (ids < n)
    flat = [y if r is None else jnp.where(
        _row_mask(valid, y, r), y, jnp.full((), jnp.nan, y.dtype))
            for y, r in zip(flat, out_axes)]
  else:
    start = jax.lax.stop_gradient(one(jnp.asarray(n, ids.dtype), False))
    flat = _over(keep, start, ks)
  return jax.tree.unflatten(out_tree, flat)


def _own_rows(x, mask):
  """``x`` with the rows outside ``mask`` carrying no gradient and their
  non-finite entries set to 0, for a floating array with rows (axis 0);
  anything else as it is. Their finite entries stay: a program need not be
  finite at zero (``x / |x|``), and a 0/0 in a discarded row would meet its
  zero cotangent in the adapter's gradient as a NaN in one of its own."""
  if not (hasattr(x, "shape") and x.ndim
          and jnp.issubdtype(x.dtype, jnp.inexact)):
    return x
  other = jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))
  return jnp.where(_row_mask(mask, x, 0), x, jax.lax.stop_gradient(other))


def _over(body, carry, ks):
  """``lax.scan(body, carry, ks)``'s carry; a Python loop on JAX < 0.7,
  whose scan lowers the gradient's residuals under Explicit mesh axes on
  the wrong mesh ("Context mesh ... should match the mesh of sharding")."""
  if tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 7):
    return jax.lax.scan(body, carry, ks)[0]
  for k in ks:
    carry = body(carry, k)[0]
  return carry


def _row_mask(mask, y, r: int):
  """``mask`` (one entry per row) shaped to broadcast against ``y`` along
  its row axis ``r``, sharded as ``y``'s rows."""
  mask = jc.align(mask, y, {0: r})
  return jax.lax.broadcast_in_dim(
      mask, tuple(m if a == r else 1 for a, m in enumerate(y.shape)), (r,))


def row_delta(stacked, index, norms: dict, one_hot: bool = False) -> Any:
  """``stacked`` with each stack replaced by its adapter ``index`` (a
  :class:`LoraDelta`; ``norms``: :func:`base_norms`, for DoRA's ``-1``)."""
  return map_with_paths(
      lambda p, s: _row(s, index, one_hot, norms.get(p))
      if isinstance(s, LoraStack) else s, stacked, is_leaf=is_stack_or_none)


def _row(s: LoraStack, index, one_hot: bool, base_norm=None) -> LoraDelta:
  if one_hot and s.magnitude is None:
    return s.row_of_all(index)
  return s.row(index, base_norm)


def first_row(base, stacked, ids):
  """The delta of a one-row batch: each stack's adapter ``ids[0]``."""
  return row_delta(stacked, ids[0],
                                base_norms(base, stacked))


def _resized(x, size: int):
  """``x``'s first row (``size`` 1), or ``x`` twice over along its rows
  (``size`` ``2 * n_rows``), for the row-axis probe of :func:`row_axes`."""
  return x[:1] if size == 1 else jnp.concatenate([x, x])


def row_axes(fn, base, stacked, args, kwargs, n_rows: int
              ) -> tuple[list, Any, bool]:
  """Where each output of a mixed batch holds its rows (None: it does not
  read them), or a ValueError naming the output that has none; and whether
  the batch must run whole, per adapter (:func:`per_adapter`), because a
  row cannot run alone: rows typed on a mesh with Explicit axes, or a
  program holding a ``shard_map`` (which may split the rows over devices:
  one row cannot be split so)."""
  per_row_kernels = set(stacks(stacked))
  out_rows, shapes, out_tree, reads, shard_mapped = factored.output_rows(
      fn, base, args, kwargs, per_row_kernels)
  whole_only = shard_mapped or _typed_rows(args, kwargs) is not None
  one_shapes = shapes
  if any(r is factored.UNKNOWN for r in out_rows):
    # The analysis could not follow the rows to these outputs: the axis that
    # is n_rows long on the whole batch and 1 long on one row, if one is
    # (2 * n_rows long on the batch twice over where one row cannot be cut
    # from rows split over a mesh axis or split by a shard_map).
    split = shard_mapped or _typed_rows(args, kwargs, sharded=True) is not None
    size = 2 * n_rows if split else 1
    one = jax.tree.map(lambda x: _resized(x, size)
                       if is_array(x) and x.ndim else x, (args, kwargs))
    one_args, one_kwargs = one
    one_shapes = factored.output_rows(fn, base, one_args, one_kwargs,
                                      per_row_kernels)[1]
  axes = []
  for k, (r, full, row) in enumerate(zip(out_rows, shapes, one_shapes)):
    if r is factored.UNKNOWN:
      changed = [a for a, (m, n) in enumerate(zip(full, row)) if m != n]
      if (len(full) == len(row) and len(changed) == 1
          and (full[changed[0]], row[changed[0]]) == (n_rows, size)):
        r = changed[0]
      else:
        raise ValueError(
            f"wrap(..., adapter_ids=...): {_output_name(out_tree, k)} (shape "
            f"{full}) has no axis holding one entry per row of adapter_ids "
            f"({n_rows} rows): its rows are reduced, mixed together or "
            f"merged with another axis. Each row runs with its own adapter, "
            f"so every output must keep the rows on one axis of their own, "
            f"or not read them. Return per-row values (for example per-row "
            f"losses) and reduce or reshape them outside the wrapped "
            f"function.")
    elif r is None and reads[k]:
      raise ValueError(
          f"wrap(..., adapter_ids=...): {_output_name(out_tree, k)} (shape "
          f"{full}) reads no row but reads the adapted kernels, which differ "
          f"from row to row: it has no single value for the batch. Compute "
          f"it per row (keep a row axis), or outside the wrapped function "
          f"for each adapter (lj.select).")
    axes.append(r)
  return axes, out_tree, whole_only


def _output_name(out_tree, k: int) -> str:
  """``output ['loss']``, or ``the output`` for a bare array."""
  placeholder = jax.tree.unflatten(out_tree, [0] * out_tree.num_leaves)
  path = jax.tree_util.tree_flatten_with_path(placeholder)[0][k][0]
  key = jax.tree_util.keystr(path)
  return f"output {key}" if key else "the output"


def whole_batch(fn, base, stacked, ids, args, kwargs, lora_rng, **options):
  """A mixed-adapter batch in the factored engine on the whole batch at once
  (each adapted matmul's branch one batched product over rows; LoRA dropout
  draws the masks a single-adapter batch would), or None where that cannot
  be done (DoRA, rows the engine cannot follow through the program): then
  ``vmap`` over rows does it."""
  per_path = stacks(stacked)
  if any(s.magnitude is not None for s in per_path.values()):
    return None
  plain = adapters(stacked)  # single adapters beside the stacks
  check_matches(base, {**plain, **{p: s.row(0) for p, s in per_path.items()}},
                "wrap")
  try:
    return factored.factored_apply(fn, base, plain, args, kwargs,
                                   row_factors=row_factors(stacked, ids),
                                   rng=lora_rng, **options)
  except factored.NeedsRowVmap:
    return None
