"""wrap: an apply function over (base, delta) instead of params."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import warnings

import jax

from lora_jax._src import factored
from lora_jax._src import stack as stack_module
from lora_jax._src.delta import adapters
from lora_jax._src.jaxpr_core import is_array
from lora_jax._src.merge import check_matches
from lora_jax._src.merge import merge
from lora_jax._src.merge import placed_like_base
from lora_jax._src.stack import check_rows
from lora_jax._src.stack import per_row
from lora_jax._src.stack import row_factors
from lora_jax._src.stack import stacks

MODES = ("auto", "merge", "factored")


def _named_like(fn: Callable, impl: Callable) -> Callable:
  """``impl`` with ``fn``'s name and docstring but its own signature:
  ``jax.jit(..., static_argnames=...)`` and ``donate_argnames`` read the
  signature, which is ``(base, delta, *args, lora_rng=None, **kwargs)``, not
  ``fn``'s (so no ``__wrapped__``, which ``inspect.signature`` follows)."""
  for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
    try:
      setattr(impl, attr, getattr(fn, attr))
    except (AttributeError, TypeError):
      pass
  return impl


def wrap(fn: Callable[..., Any], mode: str = "auto", *,
         strict: bool = False, recompute: bool = True) -> Callable[..., Any]:
  """``fn`` over ``(base, delta)`` instead of params.

  Returns ``g(base, delta, *args, lora_rng=None, adapter_ids=None, **kwargs)
  == fn(merge(base, delta), *args, **kwargs)``, traceable by ``jit``,
  ``grad`` (also forward mode), ``vmap`` and ``shard_map``. ``g`` reports
  that signature, so ``jax.jit(g, static_argnames="deterministic")`` marks
  ``fn``'s keyword static and ``donate_argnames="delta"`` donates the delta.

  Engines:
    * ``"merge"`` builds ``W0 + scale * a @ b`` for every adapted kernel inside
      the traced function and calls ``fn`` unchanged. Works for any function;
      its backward pass computes a full-size gradient per adapted kernel.
    * ``"factored"`` never materialises the update: it rewrites the ops that
      consume each kernel to ``op(x, W0) + scale * op(op(x, a), b)``. Ops
      without a factored rule get that kernel merged for that use, with a
      warning (an error with ``strict=True``). A narrow frozen kernel (a
      :class:`lora_jax.QArray`, a bf16 kernel the program widens) is widened
      at its point of use and again in the backward pass, never kept; such a
      kernel supports reverse-mode differentiation only.
    * ``"auto"`` is factored, except where the shapes make merging cheaper
      (many tokens and a large rank); see :func:`lora_jax.explain`.

  Saved activations (factored and auto): each adapter keeps its input ``x``
  for ``dA = x^T g``. Where ``x`` is elementwise maths (GELU, SiLU * up,
  LayerNorm's scale and shift) on values the backward pass keeps anyway,
  ``recompute=True`` keeps those values instead and recomputes ``x`` (and
  the maths' own intermediates) in the backward pass; on W3 this removes a
  third of the step's temporary memory (``benchmarks/results/w3_cpu.md``).
  The recomputation is a ``custom_vjp`` (XLA:CPU merges ``jax.checkpoint``'s
  recomputation back into the forward pass): reverse mode works at any
  order, and an eager ``jax.jvp`` around ``g`` falls back to no
  recomputation by itself, but forward mode traced under ``jit`` (``jvp``,
  ``jacfwd``, Hessian-vector products as ``jvp`` of ``grad``) needs
  ``recompute=False``; JAX's error then is "can't apply forward-mode
  autodiff (jvp) to a custom_vjp function".

  LoRA dropout (``LoraConfig(dropout=p)``) is applied only when ``g`` is
  called with ``lora_rng=key``; without a key the call is deterministic. As
  for every JAX random function, one key gives one mask: under ``jax.vmap``
  with a shared key every example gets the same mask, so pass one key per
  example (``jax.random.split(key, batch)``) for independent masks.

  A stacked delta (:func:`lora_jax.stack`) needs ``adapter_ids``: an int
  array with one entry per row of the array arguments (their axis 0); row
  ``i`` uses adapter ``ids[i]``, ``-1`` the base alone. Rows must be
  independent, as in serving. The factored and auto engines run the batch
  whole where they can follow the rows through the program (axis 0 of every
  argument, through elementwise ops, matmuls, reshapes, reductions over other
  axes, ``scan`` over layers, ...): the frozen matmuls are the model's own and
  each adapted ``x @ W``'s branch is one batched product over rows with each
  row's factors. Where the rows cannot be followed (a reduction over rows,
  an op without a rule), an adapted kernel is used otherwise (an embedding,
  ``x @ W.T``, a convolution), with DoRA or with LoRA dropout, the function
  runs once per row under ``vmap`` instead (a one-hot contraction over the whole stack while
  its total rank is small, each row's gathered factors beyond); the merge
  engine always does, building one merged kernel per row. Randomness inside
  ``fn`` (its own dropout) differs between the two forms: run whole, each
  row draws its own.

  Args:
    fn: ``fn(params, *args, **kwargs)``, e.g. ``lambda p, x:
      model.apply({"params": p}, x)`` or an NNX ``merge``-and-call.
    mode: ``"auto"``, ``"factored"`` or ``"merge"``.
    strict: raise :class:`lora_jax.FallbackError` instead of merging a kernel
      that has no factored rule.
    recompute: recompute adapters' inputs in the backward pass where they
      are elementwise maths on kept values (see above); ``False`` for
      forward-mode differentiation under ``jit``.

  Returns:
    ``g(base, delta, *args, lora_rng=None, adapter_ids=None, **kwargs)``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> f = lambda p, x: x @ p["kernel"]
  >>> params = {"kernel": jnp.eye(3)}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=1, targets="kernel"),
  ...                        jax.random.key(0))
  >>> bool((lj.wrap(f)(base, delta, jnp.ones(3)) == f(params, jnp.ones(3))).all())
  True
  """
  if mode not in MODES:
    raise ValueError(f"lora_jax.wrap: mode must be one of {MODES}, got {mode!r}.")

  if mode == "merge":
    def single(base, delta, *args, lora_rng=None, **kwargs):
      if lora_rng is not None:
        dropping = [p for p, d in adapters(delta).items() if d.dropout]
        if dropping:
          raise ValueError(
              f"wrap(mode='merge') cannot apply LoRA dropout (it acts on the "
              f"LoRA branch's input, which a merged kernel no longer has): "
              f"{dropping[:3]} have dropout > 0. Use mode='factored' or "
              f"'auto', or call without lora_rng.")
      return fn(merge(base, delta), *args, **kwargs)
  else:
    choose = None if mode == "factored" else factored.cheaper_engine

    def single(base, delta, *args, lora_rng=None, **kwargs):
      deltas = adapters(delta)
      check_matches(base, deltas, "wrap")
      # a plainly loaded adapter meets a base on a mesh: factors go where
      # their kernels are (eager calls; under jit the compiler places them)
      deltas = placed_like_base(base, deltas)
      return factored.factored_apply(fn, base, deltas, args, kwargs,
                                     strict=strict, choose=choose,
                                     rng=lora_rng, recompute=recompute)

  def wrapped(base, delta, *args, lora_rng=None, adapter_ids=None, **kwargs):
    if not stacks(delta):
      if adapter_ids is not None:
        raise ValueError(
            "wrap: adapter_ids= chooses adapters of a stack, but this delta "
            "holds single adapters. Stack them first: lj.stack([d1, d2, "
            "...]).")
      return single(base, delta, *args, lora_rng=lora_rng, **kwargs)
    if adapter_ids is None:
      raise ValueError(
          "wrap: the delta is a stack of adapters (lj.stack); pass "
          "adapter_ids= (one adapter index per row, -1 for none), or take "
          "one adapter out with lj.select(stacked, k).")
    n = next(iter(stacks(delta).values())).size
    ids = check_rows(adapter_ids, args, kwargs, n)
    stack_module.check_stack_bases(base, delta)  # PiSSA / OLoRA marks
    if mode != "merge" and stack_module.WHOLE_BATCH:
      whole = _whole_batch(fn, base, delta, ids, args, kwargs,
                           lora_rng, strict=strict, choose=choose,
                           recompute=recompute)
      if whole is not None:
        return whole
    apply = lambda b, d, key, *a, **k: single(b, d, *a, lora_rng=key, **k)
    if ids.shape[0] == 1:  # one row: the function itself, on that adapter
      return apply(base, _first_row(base, delta, ids), lora_rng, *args,
                   **kwargs)
    out_axes, out_tree = _row_axes(fn, base, delta, args, kwargs,
                                   ids.shape[0])
    return per_row(apply, base, delta, ids, args, kwargs, out_axes, out_tree,
                   one_hot=mode != "merge", rng=lora_rng)
  return _named_like(fn, wrapped)


def _first_row(base, stacked, ids):
  """The delta of a one-row batch: each stack's adapter ``ids[0]``."""
  return stack_module.row_delta(stacked, ids[0],
                                stack_module.base_norms(base, stacked))


def _row_axes(fn, base, stacked, args, kwargs, n_rows: int
              ) -> tuple[list, Any]:
  """Where each output of a mixed batch holds its rows (None: it does not
  read them), or a ValueError naming the output that has none."""
  per_row_kernels = set(stacks(stacked))
  out_rows, shapes, out_tree, reads = factored.output_rows(
      fn, base, args, kwargs, per_row_kernels)
  one_shapes = shapes
  if any(r is factored.UNKNOWN for r in out_rows):
    # The analysis could not follow the rows to these outputs: the axis that
    # is n_rows long on the whole batch and 1 long on one row, if one is.
    one = jax.tree.map(lambda x: x[:1] if is_array(x) and x.ndim else x,
                       (args, kwargs))
    one_args, one_kwargs = one
    one_shapes = factored.output_rows(fn, base, one_args, one_kwargs,
                                      per_row_kernels)[1]
  axes = []
  for k, (r, full, row) in enumerate(zip(out_rows, shapes, one_shapes)):
    if r is factored.UNKNOWN:
      changed = [a for a, (m, n) in enumerate(zip(full, row)) if m != n]
      if (len(full) == len(row) and len(changed) == 1
          and (full[changed[0]], row[changed[0]]) == (n_rows, 1)):
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
  return axes, out_tree


def _output_name(out_tree, k: int) -> str:
  """``output ['loss']``, or ``the output`` for a bare array."""
  placeholder = jax.tree.unflatten(out_tree, [0] * out_tree.num_leaves)
  path = jax.tree_util.tree_flatten_with_path(placeholder)[0][k][0]
  key = jax.tree_util.keystr(path)
  return f"output {key}" if key else "the output"


def _whole_batch(fn, base, stacked, ids, args, kwargs, lora_rng, **options):
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


def explain(fn: Callable[..., Any], base: Any, delta: Any, *args,
            mode: str = "auto", **kwargs) -> factored.Report:
  """Which rule handles each adapted kernel in ``wrap(fn, mode)``.

  Traces abstractly (no FLOPs). ``str(report)`` gives one line per kernel.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> f = lambda p, x: jnp.tanh(x @ p["w"])
  >>> base, delta = lj.split({"w": jnp.ones((8, 8))},
  ...                        lj.LoraConfig(rank=2, targets="w"), jax.random.key(0))
  >>> print(lj.explain(f, base, delta, jnp.ones((4, 8)), mode="factored"))
  w  dot_general
  0 merge fallback(s)
  """
  if mode == "merge":
    raise ValueError("explain describes the factored/auto engines; mode='merge' "
                     "merges every kernel.")
  report = factored.Report()
  stack_module.refuse_stacks(
      delta, "explain", "Explain one adapter of it: lj.explain(fn, base, "
      "lj.select(stacked, k), *args).")
  deltas = adapters(delta)
  check_matches(base, deltas, "explain")
  choose = None if mode == "factored" else factored.cheaper_engine
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fallbacks are in the report instead
    # Arrays (and ShapeDtypeStructs) are traced; Python flags such as
    # deterministic=True stay Python values, as they do in wrap.
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, x in enumerate(leaves) if is_array(x)]

    def run(b, d, values):
      full = list(leaves)
      for i, x in zip(dynamic, values):
        full[i] = x
      a, k = jax.tree.unflatten(treedef, full)
      return factored.factored_apply(fn, b, adapters(d), a, k, report=report,
                                     choose=choose)
    jax.eval_shape(run, base, delta, [leaves[i] for i in dynamic])
  return report
