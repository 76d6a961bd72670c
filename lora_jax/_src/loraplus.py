"""loraplus: LoRA+ (Hayou et al. 2024), factor ``b`` learning faster than ``a``.

The parameter groups are PEFT's (``peft.optimizers.create_loraplus_optimizer``,
peft 0.21): ``a`` at ``learning_rate``; ``b``, every 1-D leaf (DoRA
magnitudes, trained biases) at ``learning_rate * ratio``; both factors of an
adapter on an embedding lookup at ``embedding_lr``; every group's weight decay
``loraplus_weight_decay`` except 1-D leaves named ``bias``, which get none.
"""

from __future__ import annotations

from collections.abc import Callable
import inspect
import math
from typing import Any

import jax
import optax

from lora_jax._src.config import Selector
from lora_jax._src.config import selects
from lora_jax._src.delta import LoraDelta
from lora_jax._src.paths import EMBEDDING_TABLES
from lora_jax._src.paths import map_with_paths
from lora_jax._src.stack import LoraStack
from lora_jax._src.stack import is_stack_or_none

A, B, B_NO_DECAY, EMBEDDING = ("loraplus_a", "loraplus_b",
                               "loraplus_b_no_decay", "loraplus_embedding")




def is_embedding_adapter(path: str, delta: LoraDelta | LoraStack,
                         embeddings: Selector | None = EMBEDDING_TABLES
                         ) -> bool:
  """Whether the adapter at ``path`` updates an embedding table read by a
  lookup (PEFT's ``lora_embedding_A``/``B``), the one place lora_jax decides
  it for LoRA+.

  A :class:`LoraDelta` records no op (a lookup table and a Dense kernel have
  the same :class:`Layout`), so the decision is by path: ``embeddings`` is a
  regex full-matched on the adapter's path in the delta tree, a list of them,
  or a callable ``(path, delta) -> bool``; the default matches Flax's
  ``nn.Embed`` / ``nnx.Embed`` parameter, named ``embedding``, and tunix's
  ``input_embedding``, as :func:`lora_jax.save_peft`'s ``embeddings``.

  Args:
    path: the adapter's path in the delta tree (e.g. ``"wte/embedding"``).
    delta: the adapter (or a stack of adapters).
    embeddings: the selector; None selects nothing.

  Returns:
    True for an adapter on an embedding table.

  >>> import jax.numpy as jnp
  >>> d = LoraDelta(jnp.zeros((10, 2)), jnp.zeros((2, 4)))
  >>> is_embedding_adapter("wte/embedding", d), is_embedding_adapter(
  ...     "fc/kernel", d)
  (True, False)
  """
  return selects(embeddings, path, delta)


def _labels(tree: Any, embeddings: Selector | None) -> Any:
  """The group of every leaf of a delta tree (or of base leaves)."""

  def label(path, x):
    if x is None:
      return None
    if isinstance(x, (LoraDelta, LoraStack)):  # a stack: every adapter alike
      side = EMBEDDING if is_embedding_adapter(path, x, embeddings) else None
      # PEFT: a DoRA magnitude is 1-D, so it goes with B even on an embedding
      groups = {"a": side or A, "b": side or B,
                "magnitude": None if x.magnitude is None else B}
      kids, node = jax.tree_util.tree_flatten_with_path(
          x, is_leaf=lambda y: y is not x)  # the node's own children
      return jax.tree_util.tree_unflatten(
          node, [groups[k[0].name] for k, _ in kids])
    if getattr(x, "ndim", None) == 1:
      return B_NO_DECAY if "bias" in path else B
    return A
  return map_with_paths(label, tree, is_leaf=is_stack_or_none)


def _has_delta(tree: Any) -> bool:
  return any(isinstance(x, (LoraDelta, LoraStack))
             for x in jax.tree.leaves(tree, is_leaf=is_stack_or_none))


def loraplus_labels(params: Any, embeddings: Selector | None = EMBEDDING_TABLES
                    ) -> Any:
  """:func:`loraplus`'s group of every leaf of ``params``: a delta tree, or the
  pair ``(base, delta)`` as :func:`lora_jax.optimizer` passes it (adapter paths
  are then read in the delta alone)."""
  if (isinstance(params, (tuple, list)) and len(params) == 2
      and not _has_delta(params[0]) and _has_delta(params[1])):
    return type(params)((_labels(params[0], embeddings),  # type: ignore[misc]
                         _labels(params[1], embeddings)))
  return _labels(params, embeddings)


def _check_rate(name: str, value: Any) -> None:
  if callable(value):
    return
  try:
    number = None if isinstance(value, (bool, str)) else float(value)
  except (TypeError, ValueError):  # not a number (a string, a list ...)
    number = None
  if number is None or not math.isfinite(number) or number < 0:
    raise ValueError(f"lj.loraplus: {name}={value!r}; give a finite number "
                     f">= 0 or a schedule (a callable of the step count).")


def _times(rate: Any, ratio: float) -> Any:
  if callable(rate):
    return lambda count: rate(count) * ratio
  return rate * ratio


def _accepts(fn: Callable, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # no signature to read: assume it accepts
    return True
  return name in params or any(p.kind is p.VAR_KEYWORD
                               for p in params.values())


def loraplus(optimizer: Callable[..., optax.GradientTransformation],
             learning_rate: float | Callable[[Any], Any],
             ratio: float = 16.0,
             embedding_lr: float | Callable[[Any], Any] = 1e-6, *,
             loraplus_weight_decay: float = 0.0,
             embeddings: Selector | None = EMBEDDING_TABLES,
             **optimizer_kwargs: Any) -> optax.GradientTransformation:
  """LoRA+: ``optimizer`` with factor ``b`` learning ``ratio`` times faster.

  PEFT's ``create_loraplus_optimizer`` (peft 0.21), group for group:

  - factor ``a`` (and any other leaf of 2 or more axes: a trained base
    kernel, trainable token rows) at ``learning_rate``;
  - factor ``b`` and every 1-D leaf (DoRA magnitudes, trained biases or norm
    scales) at ``learning_rate * ratio``;
  - ``a`` and ``b`` of an adapter on an embedding lookup
    (:func:`is_embedding_adapter`: by default leaves named ``embedding``,
    Flax's ``nn.Embed``, or ``input_embedding``, tunix's) at
    ``embedding_lr``;
  - every group's weight decay is ``loraplus_weight_decay`` (default 0, as
    PEFT's, whatever the optimizer's own default), except 1-D leaves whose
    path contains ``bias``, which get none. PEFT also spares the weights of
    ``nn.LayerNorm`` modules, which a pytree does not mark: a trained norm
    scale is decayed here unless its path contains ``bias``.

  The groups follow the factors' sides, not PEFT's tensor names: ``b`` is
  always the output side. For a stacked expert kernel exchanged through
  PEFT's ``target_parameters`` (``ParamWrapper``), PEFT's ``lora_B`` is the
  *input* side (lora_jax's ``a``, see :func:`lora_jax.load_peft`), so PEFT
  gives that side ``lr * ratio`` and the output side ``lr``: the reverse of
  the rates here for those adapters.

  Each group is ``optimizer(learning_rate=..., weight_decay=...,
  **optimizer_kwargs)`` with its own state; ``optax.adamw`` here is torch's
  ``AdamW`` in PEFT (same betas and eps). Learning rates may be schedules.
  Use it on the delta alone (``tx.init(delta)``) or inside
  :func:`lora_jax.optimizer` for the pair ``(base, delta)``, where the
  ``trainable`` base leaves join the groups by the rules above.

  Args:
    optimizer: an optax constructor taking ``learning_rate`` (and
      ``weight_decay`` when ``loraplus_weight_decay`` is not 0), e.g.
      ``optax.adamw``.
    learning_rate: factor ``a``'s rate, a number or a schedule.
    ratio: ``b``'s rate over ``a``'s (PEFT's ``loraplus_lr_ratio``).
    embedding_lr: the rate of embedding adapters' factors (PEFT's
      ``loraplus_lr_embedding``), a number or a schedule.
    loraplus_weight_decay: every group's weight decay (see above).
    embeddings: which adapters are on embedding lookups: a regex
      full-matched on the adapter's path in the delta tree, a list of them,
      a callable ``(path, delta) -> bool``, or None for none.
    **optimizer_kwargs: passed to every group's ``optimizer`` (e.g. ``b1``,
      ``eps``).

  Returns:
    An optax ``GradientTransformation`` over a delta tree (or the pair).

  Raises:
    ValueError: a negative or non-finite rate or ``ratio``;
      ``weight_decay`` among ``optimizer_kwargs``
      (PEFT's groups override the optimizer's weight decay: give
      ``loraplus_weight_decay``); a non-zero ``loraplus_weight_decay`` for an
      optimizer without ``weight_decay``.

  >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
  >>> delta = {"fc": {"kernel": lj.LoraDelta(jnp.ones((3, 2)), jnp.ones((2, 4)))},
  ...          "wte": {"embedding": lj.LoraDelta(jnp.ones((5, 2)),
  ...                                           jnp.ones((2, 3)))}}
  >>> tx = lj.loraplus(optax.sgd, 0.1, ratio=4.0, embedding_lr=0.01)
  >>> grads = jax.tree.map(jnp.ones_like, delta)
  >>> updates, _ = tx.update(grads, tx.init(delta))
  >>> [round(float(x.ravel()[0]), 3) for x in jax.tree.leaves(updates)]
  [-0.1, -0.4, -0.01, -0.01]
  """
  if not callable(optimizer):
    raise TypeError(f"lj.loraplus: optimizer={optimizer!r}; give an optax "
                    f"constructor such as optax.adamw (not an instance).")
  if "weight_decay" in optimizer_kwargs:
    raise ValueError(
        "lj.loraplus: weight_decay in optimizer_kwargs; LoRA+ sets every "
        "group's weight_decay: give loraplus_weight_decay (PEFT ignores the "
        "optimizer's own).")
  _check_rate("learning_rate", learning_rate)
  _check_rate("embedding_lr", embedding_lr)
  if callable(ratio):
    raise ValueError(f"lj.loraplus: ratio={ratio!r}; give a number (a "
                     f"schedule goes in learning_rate).")
  _check_rate("ratio", ratio)
  _check_rate("loraplus_weight_decay", loraplus_weight_decay)
  decays = _accepts(optimizer, "weight_decay")
  if not decays and loraplus_weight_decay:
    raise ValueError(
        f"lj.loraplus: loraplus_weight_decay={loraplus_weight_decay!r} but "
        f"{getattr(optimizer, '__name__', optimizer)!r} takes no "
        f"weight_decay; use an optimizer with decoupled weight decay such "
        f"as optax.adamw, or loraplus_weight_decay=0.")

  def make(rate, decay):
    kw = {"weight_decay": float(decay)} if decays else {}
    return optimizer(learning_rate=rate, **kw, **optimizer_kwargs)
  transforms = {
      A: make(learning_rate, loraplus_weight_decay),
      B: make(_times(learning_rate, ratio), loraplus_weight_decay),
      B_NO_DECAY: make(_times(learning_rate, ratio), 0.0),
      EMBEDDING: make(embedding_lr, loraplus_weight_decay),
  }
  return optax.multi_transform(
      transforms, lambda params: loraplus_labels(params, embeddings))
