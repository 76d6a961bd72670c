"""wrap: an apply function over (base, delta) instead of params."""

from __future__ import annotations

import functools
from typing import Any, Callable

from lora_jax.merge import merge

MODES = ("auto", "merge", "factored")


def wrap(fn: Callable[..., Any], mode: str = "auto") -> Callable[..., Any]:
  """Returns ``g(base, delta, *args, **kwargs) == fn(merge(base, delta), ...)``.

  ``mode="merge"`` builds ``W0 + scale * a @ b`` for every adapted kernel inside
  the traced function and calls ``fn`` unchanged: under ``jit`` it is one
  compiled program, and it works for any function. ``"auto"`` picks the best
  available engine (today: merge).

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
  if mode == "factored":
    raise NotImplementedError(
        "lora_jax.wrap(mode='factored') is not implemented yet; use "
        "mode='merge' (or 'auto'), which computes the same values.")

  @functools.wraps(fn)
  def wrapped(base, delta, *args, **kwargs):
    return fn(merge(base, delta), *args, **kwargs)

  return wrapped
