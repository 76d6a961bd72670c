"""split: partition a parameter pytree into a frozen base and a LoRA delta."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig, selector_patterns, selects
from lora_jax.delta import LoraDelta
from lora_jax.discover import layout_from_uses, trace_uses
from lora_jax.layouts import Layout
from lora_jax.paths import leaves_with_paths, map_with_paths, preview


def _check_targets_match(config: LoraConfig, leaves: list[tuple[str, Any]]):
  paths = [p for p, _ in leaves]
  for pattern in selector_patterns(config.targets):
    if not any(selects(pattern, p, x) for p, x in leaves):
      raise ValueError(
          f"LoraConfig.targets: the regex {pattern!r} matches no leaf path "
          f"(full match on '/'-joined paths). Some paths that exist: "
          f"{preview(paths)}.")


def _factor_dtype(config: LoraConfig, kernel_dtype) -> np.dtype:
  if config.dtype is not None:
    return config.dtype
  return np.dtype(jnp.promote_types(kernel_dtype, jnp.float32))


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


def split(params: Any, config: LoraConfig, key: jax.Array,
          apply_fn: Callable | None = None, example_args: Sequence[Any] = (),
          example_kwargs: dict | None = None) -> tuple[Any, Any]:
  """Partitions ``params`` into a frozen ``base`` and a LoRA ``delta``.

  Pure: ``base`` holds the very arrays of ``params``; ``delta`` has the same
  structure with a :class:`LoraDelta` at every targeted leaf and ``None``
  elsewhere. A 2-D kernel is taken as ``(in, out)`` unless ``config.layouts``
  says otherwise; with ``apply_fn`` (called as ``apply_fn(params,
  *example_args, **example_kwargs)``) the layout of every targeted kernel is
  read off an abstract trace of the function (no FLOPs are spent).

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
  leaves = leaves_with_paths(params)
  _check_targets_match(config, leaves)
  chosen = [(i, p, x) for i, (p, x) in enumerate(leaves)
            if config.is_target(p, x)]
  if not chosen:
    raise ValueError(
        f"LoraConfig selects no leaf (targets={config.targets!r}, "
        f"exclude={config.exclude!r}). Some paths that exist: "
        f"{preview(p for p, _ in leaves)}.")
  for _, p, x in chosen:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
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
    uses = trace_uses(apply_fn, params, example_args, example_kwargs,
                      [i for i, _, _ in need_trace])
    for (i, p, x), u in zip(need_trace, uses):
      layouts[p] = layout_from_uses(p, len(x.shape), u)

  deltas: dict[str, LoraDelta] = {}
  for n, (i, p, x) in enumerate(chosen):
    layout = layouts[p]
    shape = tuple(x.shape)
    max_rank = layout.max_rank(shape)
    if config.rank > max_rank:
      raise ValueError(
          f"rank {config.rank} is larger than the smaller side ({max_rank}) of "
          f"{p!r} (shape {shape}, inputs {layout.inputs}, outputs "
          f"{layout.outputs}). Use rank <= {max_rank} or exclude the leaf.")
    a_shape, b_shape = layout.factor_shapes(shape, config.rank)
    fan_in = math.prod(layout.sizes(shape)[1])
    a, b = init_factors(config.init, jax.random.fold_in(key, n), a_shape,
                        b_shape, _factor_dtype(config, x.dtype), fan_in,
                        config.rank)
    deltas[p] = LoraDelta(a, b, scale=config.scale, layout=layout)

  delta = map_with_paths(lambda p, x: deltas.get(p), params)
  return params, delta
