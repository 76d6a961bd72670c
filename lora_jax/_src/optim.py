"""optimizer: an optax transformation that trains the adapters only."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lora_jax._src.config import Selector, selects, selector_patterns
from lora_jax._src.paths import leaves_with_paths, map_with_paths, preview

TRAIN, FREEZE = "lora_train", "lora_freeze"


def trainable_labels(params: Any, trainable: Selector | None = None) -> Any:
  """Labels for the pair ``(base, delta)``: every delta leaf (LoRA factor) and
  every base leaf selected by ``trainable`` is ``"lora_train"``, the rest is
  ``"lora_freeze"``."""
  if not (isinstance(params, (tuple, list)) and len(params) == 2):
    raise TypeError(
        "lora_jax.optimizer works on the pair (base, delta); got a "
        f"{type(params).__name__}. To train the delta alone, use any optax "
        "transformation directly: tx.init(delta).")
  base, delta = params
  if trainable is not None:
    leaves = leaves_with_paths(base)
    for pattern in selector_patterns(trainable):
      if not any(selects(pattern, p, x) for p, x in leaves):
        raise ValueError(
            f"lora_jax.optimizer: trainable={pattern!r} matches no base leaf. "
            f"Some paths that exist: {preview(p for p, _ in leaves)}.")
  base_labels = map_with_paths(
      lambda p, x: TRAIN if selects(trainable, p, x) else FREEZE, base)
  delta_labels = jax.tree.map(lambda _: TRAIN, delta)
  return type(params)((base_labels, delta_labels))


def optimizer(tx: optax.GradientTransformation,
              trainable: Selector | Callable[[str, Any], bool] | None = None
              ) -> optax.GradientTransformation:
  """``tx`` for the pair ``(base, delta)``, with everything else frozen.

  Only the LoRA factors, and base leaves selected by ``trainable`` (a regex
  full-matched on the path, a list of them, or a callable ``(path, leaf) ->
  bool``; e.g. biases, norms, a classifier head), get ``tx``'s updates and
  optimiser state; every other leaf gets zero updates and holds no state.

  >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
  >>> params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(0))
  >>> tx = lj.optimizer(optax.adam(1e-3), trainable=r".*/bias")
  >>> state = tx.init((base, delta))
  >>> sum(x.size for x in jax.tree.leaves(state) if x.ndim)  # mu, nu: 2*(16+4)
  40
  """
  return optax.multi_transform(
      {TRAIN: tx, FREEZE: optax.set_to_zero()},
      lambda params: trainable_labels(params, trainable))


def trainable_leaves(base: Any, trainable: Selector) -> dict[str, Any]:
  """``{path: leaf}`` of the base leaves selected by ``trainable``.

  With :func:`with_leaves`, this is the delta-only loop's recipe for training
  biases, norms or a head beside the adapters (PEFT's ``bias`` and
  ``modules_to_save``)::

    extras = lj.trainable_leaves(base, r".*/bias|head/.*")
    state = tx.init((delta, extras))
    loss = lambda t: loss_fn(apply(lj.with_leaves(base, t[1]), t[0], x), y)
    grads = jax.grad(loss)((delta, extras))

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> base = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
  >>> list(lj.trainable_leaves(base, r".*/bias"))
  ['fc/bias']
  """
  leaves = leaves_with_paths(base)
  chosen = {p: x for p, x in leaves if selects(trainable, p, x)}
  if not chosen:
    raise ValueError(f"trainable={trainable!r} selects no base leaf. Some "
                     f"paths that exist: {preview(p for p, _ in leaves)}.")
  return chosen


def with_leaves(base: Any, leaves: dict[str, Any]) -> Any:
  """``base`` with the leaves at the given paths replaced (shapes checked).

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> base = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
  >>> lj.with_leaves(base, {"fc/bias": jnp.ones(2)})["fc"]["bias"]
  Array([1., 1.], dtype=float32)
  """
  seen = set()

  def fn(path, x):
    if path not in leaves:
      return x
    new = leaves[path]
    if tuple(new.shape) != tuple(x.shape):
      raise ValueError(f"with_leaves: {path!r} has shape {tuple(x.shape)} in "
                       f"the base but {tuple(new.shape)} in the replacement.")
    seen.add(path)
    return new
  out = map_with_paths(fn, base)
  missing = [p for p in leaves if p not in seen]
  if missing:
    raise ValueError(f"with_leaves: the base has no leaf at {preview(missing)}.")
  return out
