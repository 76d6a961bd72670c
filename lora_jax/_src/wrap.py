"""wrap: an apply function over (base, delta) instead of params."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import warnings

import jax

from lora_jax._src import factored
from lora_jax._src import mixed
from lora_jax._src import stack as stack_module
from lora_jax._src.delta import adapters
from lora_jax._src.jaxpr_core import is_array
from lora_jax._src.merge import check_matches
from lora_jax._src.merge import merge
from lora_jax._src.merge import placed_like_base
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.quant import QArray
from lora_jax._src.stack import stacks
from lora_jax._src.tokens import token_deltas

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

  ``wrap(fn, mode)`` is ``g(base, delta, *args, lora_rng=None,
  adapter_ids=None, **kwargs) == fn(merge(base, delta), *args, **kwargs)``,
  traceable by ``jit``, ``grad`` (also forward mode), ``vmap`` and
  ``shard_map``; ``g`` reports that signature (for ``static_argnames`` and
  ``donate_argnames``). ``"merge"`` builds each adapted kernel inside the
  traced function; ``"factored"`` never materialises the update, rewriting
  each op that consumes a kernel to ``op(x, W0) + scale * op(op(x, a), b)``;
  ``"auto"`` is factored except where merging is cheaper. ``lora_rng=key``
  turns LoRA dropout on; ``adapter_ids`` gives each row of a batch its
  adapter of a stacked delta (``-1``: the base alone). How each engine,
  ``recompute``, dropout and mixed batches work: the docs page "How the
  engines work" (``docs/engines.rst``).

  Args:
    fn: ``fn(params, *args, **kwargs)``, e.g. ``lambda p, x:
      model.apply({"params": p}, x)`` or an NNX ``merge``-and-call.
    mode: ``"auto"``, ``"factored"`` or ``"merge"``.
    strict: raise :class:`lora_jax.FallbackError` instead of merging a kernel
      that has no factored rule.
    recompute: recompute adapters' inputs in the backward pass where they
      are elementwise maths on kept values; ``False`` for forward-mode
      differentiation under ``jit`` and ``jax.linearize``.

  Returns:
    ``g(base, delta, *args, lora_rng=None, adapter_ids=None, **kwargs)``.

  Raises:
    ValueError: ``mode`` is not one of the three. Calling ``g`` raises what
      :func:`lora_jax.merge` raises for mismatched trees; a ``ValueError``
      for a stacked delta without ``adapter_ids`` (or ids without a stack),
      ids outside the stack, an output that mixes the rows, or dropout in
      the merge engine; :class:`lora_jax.FallbackError` with ``strict=True``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> f = lambda p, x: x @ p["kernel"]
  >>> params = {"kernel": jnp.eye(3)}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=1, targets="kernel"),
  ...                        jax.random.key(0))
  >>> bool((lj.wrap(f)(base, delta, jnp.ones(3)) == f(params, jnp.ones(3))).all())
  True
  """
  return wrap_rows(fn, mode, strict=strict, recompute=recompute)


def wrap_rows(fn: Callable[..., Any], mode: str = "auto", *,
              rows: str = "auto", strict: bool = False,
              recompute: bool = True) -> Callable[..., Any]:
  """:func:`wrap` with an explicit choice of how a mixed-adapter batch runs
  (``rows``, one of :data:`mixed.ROWS`): ``"auto"`` is :func:`wrap`;
  ``"gather"`` and ``"one-hot"`` force the ``vmap``-over-rows forms, for the
  benchmarks and tests that measure and check them."""
  if mode not in MODES:
    raise ValueError(f"lora_jax.wrap: mode must be one of {MODES}, got {mode!r}.")
  if rows not in mixed.ROWS:
    raise ValueError(f"wrap_rows: rows must be one of {mixed.ROWS}, got "
                     f"{rows!r}.")

  choose = None if mode != "auto" else factored.cheaper_engine
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
    def single(base, delta, *args, lora_rng=None, **kwargs):
      deltas = engine_deltas(base, delta, "wrap")
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
    return mixed.run(fn, single, base, delta, adapter_ids, args, kwargs,
                     lora_rng, mode=mode, rows=rows, strict=strict,
                     choose=choose, recompute=recompute)
  return _named_like(fn, wrapped)


def engine_deltas(base, delta, what: str) -> dict:
  """``{path: LoraDelta}`` the factored engine carries, checked against the
  base and placed like it; trainable tokens as their low-rank form
  (:meth:`TrainableTokens.as_lora`: the one-hot of the ids times the rows'
  change), so every consumer rule applies and the gradient stays ``(n,
  dim)``."""
  deltas = adapters(delta)
  tokens = token_deltas(delta)
  check_matches(base, deltas, what, tokens)
  # a plainly loaded adapter meets a base on a mesh: factors go where
  # their kernels are (eager calls; under jit the compiler places them)
  deltas = placed_like_base(base, deltas)
  if tokens:
    flat = dict(leaves_with_paths(base))
    for p, t in tokens.items():
      table = flat[p]
      deltas[p] = t.as_lora(table.dequantize() if isinstance(table, QArray)
                            else table, p)
  return deltas


def explain(fn: Callable[..., Any], base: Any, delta: Any, *args,
            mode: str = "auto", **kwargs) -> factored.Report:
  """Which rule handles each adapted kernel in ``wrap(fn, mode)``.

  Traces abstractly (no FLOPs). ``str(report)`` gives one line per kernel
  and the number of merge fallbacks.

  Args:
    fn: the function :func:`wrap` would wrap.
    base: the frozen parameters.
    delta: a delta of single adapters (not a stack).
    *args: ``fn``'s inputs (arrays or ``jax.ShapeDtypeStruct``).
    mode: ``"auto"`` or ``"factored"``.
    **kwargs: ``fn``'s keyword inputs.

  Returns:
    A :class:`lora_jax.Report`.

  Raises:
    ValueError: ``mode="merge"`` (it merges every kernel), a stacked delta
      (explain one adapter: ``lj.select``), or trees :func:`lora_jax.merge`
      would refuse.

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
  engine_deltas(base, delta, "explain")  # checks the trees
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
      return factored.factored_apply(fn, b, engine_deltas(b, d, "explain"),
                                     a, k, report=report, choose=choose)
    jax.eval_shape(run, base, delta, [leaves[i] for i in dynamic])
  return report
