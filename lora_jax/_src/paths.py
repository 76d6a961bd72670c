"""Leaf paths: how a leaf of a parameter pytree is named.

A path is the '/'-joined key path of a leaf, e.g. ``"h0/attn/query/kernel"``.
Flax NNX wraps arrays in ``Variable`` nodes whose child sits under the attribute
``value``; that attribute is not part of the path, so a Linen tree and the
equivalent NNX state name their kernels alike.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax

# Attribute names of wrapper nodes (NNX Variables) that are not part of a path.
_TRANSPARENT_ATTRS = frozenset({"value", "raw_value"})


def _key_str(key: Any) -> str | None:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name in _TRANSPARENT_ATTRS else key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath: Iterable[Any]) -> str:
  """Joins a JAX key path into the '/'-separated name used by lora_jax."""
  parts = (_key_str(k) for k in keypath)
  return "/".join(p for p in parts if p is not None)


def _stop_at(is_leaf: Callable[[Any], bool] | None) -> Callable[[Any], bool]:
  # Nodes that stand for one array (lora_jax.QArray: codes + absmax) set the
  # class attribute `lora_jax_leaf`; a path walk stops there, so a quantized
  # kernel is one leaf at its kernel's path.
  whole = lambda x: getattr(type(x), "lora_jax_leaf", False)
  return whole if is_leaf is None else lambda x: whole(x) or is_leaf(x)


def leaves_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
  """Flattens ``tree`` into ``(path, leaf)`` pairs in ``tree_leaves`` order
  (a ``QArray`` is one leaf)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree,
                                                 is_leaf=_stop_at(is_leaf))
  return [(path_str(kp), leaf) for kp, leaf in flat]


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any, *rest: Any,
                   is_leaf: Callable[[Any], bool] | None = None) -> Any:
  """``jax.tree.map`` whose function also receives each leaf's path (a
  ``QArray`` is one leaf)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest,
      is_leaf=_stop_at(is_leaf))


def preview(paths: Iterable[str], limit: int = 8) -> str:
  """A short, readable list of paths for error messages."""
  paths = list(paths)
  shown = ", ".join(repr(p) for p in paths[:limit])
  more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
  return f"[{shown}{more}]"
