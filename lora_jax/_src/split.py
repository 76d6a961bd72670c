"""split: partition a parameter pytree into a frozen base and a LoRA delta."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.config import ALL_LINEAR
from lora_jax._src.config import LoraConfig
from lora_jax._src.config import selects
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.discover import layout_from_uses
from lora_jax._src.discover import linear_weights
from lora_jax._src.discover import trace_uses
from lora_jax._src.dtypes import is_float
from lora_jax._src.inits import make_adapter
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.quant import QArray
from lora_jax._src.quant import dequantize_array
from lora_jax._src.quant import has_qarrays
from lora_jax._src.sharding import factor_shardings
from lora_jax._src.sharding import place_like_kernel
from lora_jax._src.tokens import make_tokens


def _factor_dtype(config: LoraConfig, kernel_dtype) -> np.dtype:
  if config.dtype is not None:
    return config.dtype
  return np.dtype(jnp.promote_types(kernel_dtype, jnp.float32))


def split(params: Any, config: LoraConfig, key: jax.Array,
          apply_fn: Callable | None = None, example_args: Sequence[Any] = (),
          example_kwargs: dict | None = None) -> tuple[Any, Any]:
  """Partitions ``params`` into a frozen ``base`` and a LoRA ``delta``.

  Pure: ``base`` holds the very arrays of ``params`` (for PiSSA / OLoRA inits,
  the residual ``W0 - scale * a @ b`` at each adapted kernel, so that
  ``merge(base, delta)`` still equals ``params``); ``delta`` has the same
  structure with a :class:`LoraDelta` at every targeted leaf and ``None``
  elsewhere. A 2-D kernel is taken as ``(in, out)`` unless ``config.layouts``
  says otherwise; with ``apply_fn`` (called as ``apply_fn(params,
  *example_args, **example_kwargs)``) the layout of every targeted kernel is
  read off an abstract trace of the function (no FLOPs are spent). A tree
  holding :class:`lora_jax.QArray` kernels is split on their shapes; the
  base returned is the tree itself.

  Args:
    params: the parameter pytree (Flax Linen ``params``, an NNX ``nnx.Param``
      state, any nested dict/list of arrays).
    config: the :class:`lora_jax.LoraConfig`: which leaves, which rank, which
      init.
    key: a PRNG key for the factors' init.
    apply_fn: optional ``apply_fn(params, *example_args, **example_kwargs)``,
      traced abstractly to read each targeted kernel's layout (and, with
      ``targets="all-linear"``, which kernels are linear maps).
    example_args: positional example inputs of ``apply_fn`` (arrays or
      ``jax.ShapeDtypeStruct``).
    example_kwargs: keyword example inputs of ``apply_fn``.

  Returns:
    ``(base, delta)``: ``base`` is ``params`` (the residual kernels for a
    principal init), ``delta`` has ``params``' structure with a
    :class:`lora_jax.LoraDelta` at each adapted leaf (a
    :class:`lora_jax.TrainableTokens` at each ``trainable_tokens`` table)
    and ``None`` elsewhere.

  Raises:
    TypeError: ``config`` is not a ``LoraConfig``, or a target is not a
      floating-point array.
    ValueError: a regex of ``config`` matches no leaf, nothing is selected, a
      target has fewer than 2 axes, its layout cannot be told (a kernel of 3
      or more axes without ``apply_fn`` or ``config.layouts``), or a
      principal init meets a quantized kernel. Each names the leaf and the
      remedy.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=4), jax.random.key(0))
  >>> delta["dense"]["kernel"]
  LoraDelta(rank=4, kernel=(16, 32), a=f32[16,4], b=f32[4,32], scale=4)
  >>> delta["dense"]["bias"] is None and base is params
  True
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"split expects a lora_jax.LoraConfig, got {config!r}.")
  if has_qarrays(params):  # split shape stand-ins, keep the QArrays
    return _split_quantized(params, config, key, apply_fn, example_args,
                            example_kwargs)
  leaves = leaves_with_paths(params)
  config.check_patterns_match(leaves)
  chosen = [(i, p, x) for i, (p, x) in enumerate(leaves)
            if config.is_target(p, x)]
  if config.targets == ALL_LINEAR and apply_fn is not None:
    chosen = linear_weights(apply_fn, params, example_args, example_kwargs,
                            [(i, p, x) for i, (p, x) in enumerate(leaves)
                             if not selects(config.exclude, p, x)])
  if config.init_spec.kind == "loftq":
    raise ValueError(
        "split: init='loftq' makes the quantized base and the factors "
        "together from the float weights; call lora_jax.loftq(params, "
        "config, key, scheme='nf4' | 'int8') instead of split (it returns "
        "(quantized_base, delta)).")
  if not chosen and not len(config.trainable_tokens):
    raise ValueError(
        f"LoraConfig selects no leaf (targets={config.targets!r}, "
        f"exclude={config.exclude!r}). Some paths that exist: "
        f"{preview(p for p, _ in leaves)}.")
  for _, p, x in chosen:
    if not is_float(x):
      dtype = getattr(x, "dtype", None)
      raise TypeError(
          f"Target {p!r} is not a floating-point array (dtype {dtype}); LoRA "
          f"adapts float kernels only. Narrow `targets` or add it to "
          f"`exclude`.")
    if len(x.shape) < 2:
      raise ValueError(
          f"Target {p!r} has shape {tuple(x.shape)}; LoRA needs a kernel with "
          f"at least 2 axes. Narrow `targets` or add it to `exclude`.")

  layouts: dict[str, Layout] = {}
  need_trace = []
  for i, p, x in chosen:
    explicit = config.layout_for(p)
    if explicit is not None:
      if explicit.ndim != len(x.shape):
        raise ValueError(
            f"LoraConfig.layouts gives {p!r} a layout for {explicit.ndim} axes"
            f" but the kernel has shape {tuple(x.shape)}.")
      layouts[p] = explicit
    elif apply_fn is not None:
      need_trace.append((i, p, x))
    elif len(x.shape) == 2:
      layouts[p] = Layout.dense()
    else:
      raise ValueError(
          f"Cannot tell the layout of {p!r} (shape {tuple(x.shape)}) from its "
          f"shape: only 2-D kernels default to (in, out). Pass apply_fn and "
          f"example_args to split so the layout is traced, or give it in "
          f"LoraConfig(layouts={{{p!r}: lora_jax.Layout(...)}}).")
  if need_trace:
    assert apply_fn is not None  # need_trace is empty without it
    uses = trace_uses(apply_fn, params, example_args, example_kwargs,
                      [i for i, _, _ in need_trace])
    for (_, p, x), u in zip(need_trace, uses):
      layouts[p] = layout_from_uses(p, len(x.shape), u)

  deltas: dict[str, LoraDelta] = {}
  residuals: dict[str, Any] = {}
  for n, (_, p, x) in enumerate(chosen):
    d, residual = make_adapter(p, x, layouts[p], config,
                               jax.random.fold_in(key, n),
                               _factor_dtype(config, x.dtype))
    if residual is not None:
      residuals[p] = residual
    deltas[p] = place_like_kernel(x, d)

  tokens = make_tokens(params, config, set(deltas),
                       lambda dt: _factor_dtype(config, dt))
  base = params if not residuals else map_with_paths(
      lambda p, x: residuals.get(p, x), params)
  delta = map_with_paths(lambda p, x: deltas.get(p, tokens.get(p)), params)
  return base, delta


def _split_quantized(params: Any, config: LoraConfig, key: jax.Array,
                     apply_fn: Callable | None, example_args: Sequence[Any],
                     example_kwargs: dict | None) -> tuple[Any, Any]:
  """:func:`split` of a tree with ``QArray`` leaves.

  The split runs on stand-ins (shape and dtype only; dequantized kernels
  where DoRA needs their norms), the base returned is ``params`` itself, and
  each adapter is placed like its quantized kernel.
  """
  leaves = leaves_with_paths(params)
  if config.init_spec.principal:
    for path, x in leaves:
      if isinstance(x, QArray) and config.is_target(path, x):
        raise ValueError(
            f"split: {path!r} is quantized ({x!r}) and init={config.init!r} "
            f"needs its float weights (the factors come from them and the "
            f"base becomes the residual). Split the float tree first, then "
            f"quantize the residual base: base, delta = lora_jax.split("
            f"params, config, key); qbase = lora_jax.quantize(base, "
            f"{x.scheme!r}, delta=delta).")

  def stand_in(path, x):
    if not isinstance(x, QArray):
      return x
    if config.dora and config.is_target(path, x):
      return dequantize_array(x)  # DoRA's magnitude is the norm of W0
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  _, delta = split(map_with_paths(stand_in, params), config, key, apply_fn,
                   example_args, example_kwargs)
  placed = {p: x.sharding for p, x in leaves
            if isinstance(x, QArray) and x.sharding is not None}
  if not any(p in placed for p in adapters(delta)):
    return params, delta
  # Factors go where split puts those of a sharded float kernel.
  place = lambda p, d: jax.device_put(d, factor_shardings(placed[p], d)) if (
      isinstance(d, LoraDelta) and p in placed) else d
  return params, map_with_paths(place, delta, is_leaf=is_delta_or_none)
