"""Leaf paths: how a leaf of a parameter pytree is named.

A path is the '/'-joined key path of a leaf, e.g. ``"h0/attn/query/kernel"``.
Flax NNX wraps arrays in ``Variable`` nodes whose child sits under the attribute
``value`` (Linen's ``nn.Partitioned`` boxes do the same); that attribute is not
part of the path, so a Linen tree and the equivalent NNX state name their
kernels alike. Anywhere else (a NamedTuple field, a dict key) ``value`` is an
ordinary segment. Paths are unique: two leaves with the same path are an error,
since an adapter found by path would apply to both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import sys
from typing import Any

import jax

# The attribute under which a wrapper node (see _wrapper_types) holds its array.
_VALUE_ATTRS = frozenset({"value", "raw_value"})

# Embedding tables by path, full-matched: the parameter of Flax's nn.Embed and
# nnx.Embed (and of transformers' Flax ports: "model/embed_tokens/embedding",
# "transformer/wte/embedding") and tunix's embedder
# ("embedder/input_embedding"). The default of lj.loraplus's and
# lj.save_peft's ``embeddings``.
EMBEDDING_TABLES = r"(.*/)?(embedding|input_embedding)"


def _wrapper_types() -> tuple[type, ...]:
  """Node types that stand for the one array under their ``value`` attribute:
  NNX Variables and flax's boxed metadata (``nn.Partitioned``)."""
  # Read from sys.modules rather than imported: a tree can only hold these
  # nodes once flax has defined them, and lora_jax need not import flax.
  types = []
  nnx_vars = sys.modules.get("flax.nnx.variablelib")
  if nnx_vars is not None and isinstance(getattr(nnx_vars, "Variable", None),
                                         type):
    types.append(nnx_vars.Variable)
  meta = sys.modules.get("flax.core.meta")
  if meta is not None and isinstance(getattr(meta, "AxisMetadata", None), type):
    types.append(meta.AxisMetadata)
  return tuple(types)


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath: Iterable[Any]) -> str:
  """Joins a JAX key path into the '/'-separated name used by lora_jax (every
  key counts; :func:`leaves_with_paths` leaves out a wrapper's ``value``)."""
  return "/".join(_key_str(k) for k in keypath)


def _stop_at(is_leaf: Callable[[Any], bool] | None) -> Callable[[Any], bool]:
  # Nodes that stand for one array (lora_jax.QArray: codes + absmax) set the
  # class attribute `lora_jax_leaf`; a path walk stops there, so a quantized
  # kernel is one leaf at its kernel's path.
  whole = lambda x: getattr(type(x), "lora_jax_leaf", False)
  return whole if is_leaf is None else lambda x: whole(x) or is_leaf(x)


def _keyed_leaves(tree: Any, stop: Callable[[Any], bool]) -> list[tuple]:
  """``(name_keys, key_path, leaf)`` per leaf, in ``tree_leaves`` order;
  ``name_keys`` is the key path without the ``value`` attribute of wrapper
  nodes. Wrappers are opened one at a time, so the attribute is dropped only
  where its parent is known to be a wrapper."""
  wrappers = _wrapper_types()
  if not wrappers:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)
    return [(kp, kp, x) for kp, x in flat]
  out = []

  def visit(node, names, full, opened):
    flat, _ = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda y: y is not node and (
            stop(y) or isinstance(y, wrappers)))
    for kp, x in flat:
      own = kp
      if (opened and kp and isinstance(kp[0], jax.tree_util.GetAttrKey)
          and kp[0].name in _VALUE_ATTRS):
        own = kp[1:]
      if x is not node and isinstance(x, wrappers) and not stop(x):
        visit(x, names + own, full + kp, True)
      else:
        out.append((names + own, full + kp, x))

  if stop(tree):
    return [((), (), tree)]
  visit(tree, (), (), isinstance(tree, wrappers))
  return out


def _named(tree: Any, is_leaf: Callable[[Any], bool] | None
           ) -> list[tuple[str, Any]]:
  seen: dict[str, tuple] = {}
  named = []
  for names, full, leaf in _keyed_leaves(tree, _stop_at(is_leaf)):
    path = path_str(names)
    if path in seen:
      keystr = jax.tree_util.keystr
      raise ValueError(
          f"Two leaves have the same path {path!r}: tree{keystr(seen[path])} "
          f"and tree{keystr(full)}. lora_jax finds kernels and adapters by "
          f"path, so one adapter would apply to both. Rename one of them.")
    seen[path] = full
    named.append((path, leaf))
  return named


def leaves_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
  """Flattens ``tree`` into ``(path, leaf)`` pairs in ``tree_leaves`` order.

  A ``QArray`` is one leaf; an NNX Variable's ``value`` attribute is not part
  of the path.

  Args:
    tree: any pytree (dict, NamedTuple, NNX ``State`` ...).
    is_leaf: optional, as in ``jax.tree_util.tree_flatten``.

  Returns:
    A list of ``(path, leaf)``.

  Raises:
    ValueError: if two leaves have the same path.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> [p for p, _ in lj.leaves_with_paths({"fc": {"kernel": jnp.ones(2)},
  ...                                      "norms": [jnp.ones(1)]})]
  ['fc/kernel', 'norms/0']
  """
  return _named(tree, is_leaf)


def map_with_paths(fn: Callable[..., Any], tree: Any, *rest: Any,
                   is_leaf: Callable[[Any], bool] | None = None) -> Any:
  """``jax.tree.map`` whose function also receives each leaf's path.

  Args:
    fn: called as ``fn(path, leaf, *rest_leaves)``.
    tree: the pytree whose structure the result has.
    *rest: pytrees with ``tree``'s structure (or one with more depth).
    is_leaf: optional, as in ``jax.tree.map``.

  Returns:
    ``tree``'s structure holding ``fn``'s results.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> lj.map_with_paths(lambda p, x: p, {"fc": {"kernel": jnp.ones(2)}})
  {'fc': {'kernel': 'fc/kernel'}}
  """
  named = _named(tree, is_leaf)
  treedef: Any = jax.tree_util.tree_structure(tree, is_leaf=_stop_at(is_leaf))
  others = [treedef.flatten_up_to(r) for r in rest]
  return treedef.unflatten(
      [fn(p, x, *xs) for (p, x), *xs in zip(named, *others)])


def preview(paths: Iterable[str], limit: int = 8) -> str:
  """A short, readable list of paths for error messages."""
  paths = list(paths)
  shown = ", ".join(repr(p) for p in paths[:limit])
  more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
  return f"[{shown}{more}]"
