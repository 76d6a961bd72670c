"""optimizer: an optax transformation that trains the adapters only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import optax

from lora_jax._src.config import Selector
from lora_jax._src.config import check_regex_matches
from lora_jax._src.config import selector_patterns
from lora_jax._src.config import selects
from lora_jax._src.delta import is_concrete
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview

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
      check_regex_matches(pattern, [p for p, _ in leaves],
                          "lora_jax.optimizer: trainable", "base leaf path")
  # Integer and key leaves (an NNX Rngs counter and key) have no gradient:
  # frozen whatever `trainable` says.
  base_labels = map_with_paths(
      lambda p, x: TRAIN if _is_float(x) and selects(trainable, p, x)
      else FREEZE, base)
  delta_labels = jax.tree.map(lambda _: TRAIN, delta)
  return type(params)((base_labels, delta_labels))  # type: ignore[misc]


def _is_float(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _check_gradients(grads: Any, labels: Any, checked: list) -> None:
  """Catches the gradients lora_jax.optimizer cannot use well (see the
  messages); ``checked`` makes the eager value check run once."""
  pairs = list(zip(leaves_with_paths(grads[0]), jax.tree.leaves(labels[0])))
  # float0 gradients come from jax.grad(..., allow_int=True) over integer or
  # key leaves; optax.apply_updates cannot add anything to those leaves.
  float0 = [p for (p, g), _ in pairs
            if getattr(g, "dtype", None) == jax.dtypes.float0]
  if float0:
    raise TypeError(
        f"lora_jax.optimizer: the base gradient has float0 leaves at "
        f"{preview(float0)}: integer or key leaves (an NNX Rngs counter or "
        f"key) that optax.apply_updates cannot update. Differentiate the "
        f"delta only: grads = jax.grad(lambda d: loss(base, d))(delta) with "
        f"tx.init(delta); or keep such state out of the base: graph, params, "
        f"rest = nnx.split(model, nnx.Param, ...), then lora_jax.split(params"
        f", ...).")
  frozen = [(p, g) for (p, g), label in pairs if label == FREEZE]
  if checked or not frozen or not all(
      is_concrete(g) for _, g in frozen):
    return  # under jit, reading the values would force their computation
  checked.append(True)
  nonzero = [p for p, g in frozen if _is_float(g) and bool(jnp.any(g != 0))]
  if nonzero:
    warnings.warn(
        f"lora_jax.optimizer received non-zero gradients for {len(nonzero)} "
        f"frozen base leaves, e.g. {preview(nonzero, 3)}. They get no "
        f"update, but a transformation wrapped around lora_jax.optimizer "
        f"sees them: optax.chain(optax.clip_by_global_norm(c), "
        f"lora_jax.optimizer(tx)) clips by a norm that includes them and "
        f"optax.MultiSteps(lora_jax.optimizer(tx)) accumulates them. Put "
        f"such transformations inside: lora_jax.optimizer(optax.chain("
        f"optax.clip_by_global_norm(c), tx)); or differentiate the delta "
        f"only (jax.grad(lambda d: loss(base, d))(delta), with tx.init(delta))"
        f", which also skips computing them.", UserWarning, stacklevel=3)


def optimizer(tx: optax.GradientTransformation,
              trainable: Selector | Callable[[str, Any], bool] | None = None
              ) -> optax.GradientTransformationExtraArgs:
  """``tx`` for the pair ``(base, delta)``, with everything else frozen.

  The first choice is the delta-only loop, which needs no lora_jax
  optimiser: ``state = tx.init(delta)`` and ``grads = jax.grad(lambda d:
  loss(base, d))(delta)``. Any optax transformation, wrappers included
  (``clip_by_global_norm``, ``MultiSteps``, ...), then sees the LoRA factors
  only, and no gradient of a frozen weight is computed.

  ``lora_jax.optimizer`` is for training the pair (e.g. with ``trainable``
  base leaves). Only the LoRA factors, and the float base leaves selected by
  ``trainable`` (a regex full-matched on the path, a list of them, or a
  callable ``(path, leaf) -> bool``; e.g. biases, norms, a classifier head),
  get ``tx``'s updates and optimiser state; every other leaf (integer and key
  leaves such as an NNX Rngs counter always) gets zero updates and holds no
  state. Put every transformation *inside*: ``lora_jax.optimizer(
  optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))`` clips by
  the norm of the trained leaves; ``optax.chain(optax.clip_by_global_norm(
  1.0), lora_jax.optimizer(...))`` or ``optax.MultiSteps(lora_jax.optimizer(
  ...))`` would see the frozen base's gradients too (an eager ``update`` warns
  when frozen leaves get non-zero gradients).

  Args:
    tx: the optax transformation for the trained leaves.
    trainable: base leaves to train beside the factors, or None.

  Returns:
    An optax ``GradientTransformationExtraArgs`` over ``(base, delta)``.

  Raises:
    TypeError: ``init``/``update`` get something other than the pair
      ``(base, delta)``, or a base gradient with ``float0`` leaves (integer
      or key state), each with the remedy.
    ValueError: a ``trainable`` regex that matches no base leaf.

  >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
  >>> params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(0))
  >>> tx = lj.optimizer(optax.chain(optax.clip_by_global_norm(1.0),
  ...                               optax.adam(1e-3)), trainable=r".*/bias")
  >>> state = tx.init((base, delta))
  >>> sum(x.size for x in jax.tree.leaves(state) if x.ndim)  # mu, nu: 2*(16+4)
  40
  """
  labels = lambda params: trainable_labels(params, trainable)
  inner = optax.with_extra_args_support(optax.multi_transform(
      {TRAIN: tx, FREEZE: optax.set_to_zero()}, labels))
  checked: list = []

  def update(grads, state, params=None, **extra_args):
    _check_gradients(grads, labels(grads if params is None else params),
                     checked)
    return inner.update(grads, state, params, **extra_args)
  return optax.GradientTransformationExtraArgs(inner.init, update)


def trainable_leaves(base: Any, trainable: Selector) -> dict[str, Any]:
  """``{path: leaf}`` of the base leaves selected by ``trainable``.

  With :func:`with_leaves`, this is the delta-only loop's recipe for training
  biases, norms or a head beside the adapters (PEFT's ``bias`` and
  ``modules_to_save``)::

    extras = lj.trainable_leaves(base, r".*/bias|head/.*")
    state = tx.init((delta, extras))
    loss = lambda t: loss_fn(apply(lj.with_leaves(base, t[1]), t[0], x), y)
    grads = jax.grad(loss)((delta, extras))

  Args:
    base: the frozen parameters.
    trainable: a regex full-matched on leaf paths, a list of regexes or a
      callable ``(path, leaf) -> bool``.

  Returns:
    ``{path: leaf}`` in tree order.

  Raises:
    ValueError: ``trainable`` selects no leaf (the error lists some paths).

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

  Args:
    base: the frozen parameters.
    leaves: ``{path: array}``, e.g. trained :func:`trainable_leaves`.

  Returns:
    ``base``'s structure with those leaves replaced.

  Raises:
    ValueError: a path the base has no leaf at, or a shape that differs.

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
