"""Trainable tokens: new values for chosen rows of an embedding table.

``LoraConfig(trainable_tokens={regex: [token ids]})`` trains only those rows
of each matching 2-D embedding table ``(vocab, dim)`` (PEFT's
``trainable_token_indices`` / ``TrainableTokensConfig``); the rest of the
table stays frozen, and a tied output head (the same table used as ``x @
table.T``, ``nn.Embed.attend``) sees the same rows, since it reads the same
leaf.

Representation. The delta tree holds a :class:`TrainableTokens` at the
table's path (where a :class:`LoraDelta` or ``None`` would be): its one
pytree child ``values`` ``(n, dim)`` holds the rows' **new values** (not
offsets), initialised to the table's rows; ``indices`` (the token ids, in
the configured order) and ``vocab`` (the table's rows) are static. So::

    merged_table = table.at[jnp.array(indices)].set(values.astype(table.dtype))

This is exactly PEFT's ``trainable_tokens_delta`` tensor: LoRA's
``trainable_token_indices={"embed_tokens": ids}`` saves it as
``<module>.token_adapter.trainable_tokens_delta`` ``(n, dim)``, row ``k``
being token ``ids[k]``, and ``TrainableTokensConfig`` as
``<module>.trainable_tokens_delta`` (``peft_type TRAINABLE_TOKENS``), with
the ids in ``token_indices`` / ``trainable_token_indices``. Export is
``values`` as it is; import builds ``TrainableTokens(values, indices,
vocab)``.

Engines. ``merge`` (and ``wrap(mode="merge")``) set the rows. The factored
engine carries the table as a low-rank update: ``table + E (values -
table[indices])`` with ``E`` the ``(vocab, n)`` one-hot matrix of the ids,
i.e. a :class:`LoraDelta` with ``a = E`` (constant), ``b = values -
table[indices]`` and scale 1. A lookup then gathers ``(tokens, n)`` rows of
``E`` and multiplies by ``b``; a tied head computes ``(x @ b.T) @ E.T``; the
gradient of ``values`` is ``(n, dim)``, never the table's ``(vocab, dim)``.

A table holds either a LoRA adapter or trainable tokens, not both.
``unmerge`` needs the original rows (``lora_jax.dora_norms(base, delta)``
returns them, as it returns DoRA's norms: what ``unmerge`` needs, taken
before merging).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.config import check_regex_matches
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import describe_array
from lora_jax._src.delta import is_concrete
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.delta import pytree_node
from lora_jax._src.dtypes import is_float
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths


@pytree_node(children=("values",), static=("indices", "vocab"))
@dataclasses.dataclass(frozen=True)
class TrainableTokens:
  """New values of some rows of a ``(vocab, dim)`` embedding table.

  ``values`` ``(n, dim)`` is the pytree child (what optimisers and
  checkpoints see): row ``k`` is the new value of table row ``indices[k]``.
  ``indices`` (a tuple of distinct ints in ``[0, vocab)``) and ``vocab`` are
  static. The adapted table is ``table.at[indices].set(values)``.

  Args:
    values: ``(n, dim)`` new rows.
    indices: the ``n`` token ids.
    vocab: the table's number of rows.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> t = lj.TrainableTokens(jnp.ones((2, 3)), (4, 1), vocab=6)
  >>> t
  TrainableTokens(indices=(4, 1), table=(6, 3), values=f32[2,3])
  >>> lj.merge({"embed": jnp.zeros((6, 3))}, {"embed": t})["embed"][:, 0]
  Array([0., 1., 0., 0., 1., 0.], dtype=float32)
  """

  values: Any
  indices: tuple = ()
  vocab: int = 0

  _DELTA_LEAF = True  # what delta.is_delta_or_none stops at

  def __post_init__(self):
    object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
    object.__setattr__(self, "vocab", int(self.vocab))
    check_indices("TrainableTokens", self.indices, self.vocab)
    shape = tuple(getattr(self.values, "shape", ()))
    if len(shape) != 2 or shape[0] != len(self.indices):
      raise ValueError(
          f"TrainableTokens: values must be (n, dim) with n = "
          f"{len(self.indices)} (one row per index), got shape {shape}.")

  def replace(self, **changes) -> TrainableTokens:
    """A copy with some fields replaced."""
    return dataclasses.replace(self, **changes)

  @property
  def kernel_shape(self) -> tuple[int, int]:
    """Shape of the table these rows belong to."""
    return (self.vocab, int(self.values.shape[-1]))

  @property
  def num_params(self) -> int:
    return int(np.prod(self.values.shape))

  def __repr__(self) -> str:
    try:
      table = f", table={self.kernel_shape}"
    except (AttributeError, IndexError, TypeError):  # placeholder children
      table = ""
    return (f"TrainableTokens(indices={self.indices}{table}, "
            f"values={describe_array(self.values)})")

  def apply(self, table: jax.Array) -> jax.Array:
    """``table`` with the rows set to ``values`` (in the table's dtype)."""
    idx = jnp.asarray(self.indices, jnp.int32)
    return _set_rows(table, idx, self.values)

  def as_lora(self, table: jax.Array, path: str = "") -> LoraDelta:
    """The same table as a low-rank update of ``table``: ``a`` the one-hot
    ``(vocab, n)`` matrix of the ids (constant), ``b = values -
    table[indices]``, scale 1 (what the factored engine carries).

    A non-finite row would reach every lookup and every logit of a tied
    head there (``0 * inf`` in the one-hot product), where merging keeps it
    to its token: concrete values holding NaN or +-inf are refused, and so
    are non-finite rows of ``table`` at the ids (merge overwrites them, but
    ``b`` subtracts them); under ``jit``, where nothing can be checked, such
    outputs are NaN, never a finite value."""
    if is_concrete(self.values) and not bool(
        jnp.isfinite(self.values).all()):
      bad = sorted({self.indices[int(i)] for i in jnp.nonzero(
          ~jnp.isfinite(self.values).all(axis=1))[0]})
      raise ValueError(
          f"Trainable tokens at {path!r}: the rows of token ids {bad[:5]} "
          f"hold NaN or +-inf. The factored engine would spread them to every "
          f"token (a one-hot product); wrap(f, mode='merge') keeps them to "
          f"their tokens. Fix the values (training diverged?) or use the merge "
          f"engine.")
    n = len(self.indices)
    dtype = jnp.result_type(self.values.dtype, jnp.float32)
    idx = jnp.asarray(self.indices, jnp.int32)
    one_hot = jnp.zeros((self.vocab, n), dtype).at[idx, jnp.arange(n)].set(1)
    rows = _rows(table, idx).astype(dtype)
    if is_concrete(rows) and not bool(jnp.isfinite(rows).all()):
      # merge overwrites these rows, so they do not reach its outputs; here
      # b = values - rows is non-finite and the one-hot product spreads it
      bad = sorted({self.indices[int(i)] for i in jnp.nonzero(
          ~jnp.isfinite(rows).all(axis=1))[0]})
      raise ValueError(
          f"Trainable tokens at {path!r}: the base table's own rows of token "
          f"ids {bad[:5]} hold NaN or +-inf. lora_jax.merge overwrites them "
          f"with the tokens' values, but the factored engine subtracts them "
          f"(b = values - rows) and its one-hot product would spread them to "
          f"every token. Set those base rows to any finite value (the merged "
          f"model does not change: table.at[{list(bad[:5])}].set(0)) or use "
          f"wrap(f, mode='merge').")
    return LoraDelta(one_hot, self.values.astype(dtype) - rows, 1.0,
                     Layout.dense())


def _rows(table: Any, idx: jax.Array) -> jax.Array:
  """``table[idx]``; under Explicit mesh axes (sharding in types) the rows
  keep the table's feature-axis sharding, whatever shards the vocabulary
  (JAX asks for the gather's out_sharding there)."""
  spec = jc.type_spec(table)
  if spec is None:
    return jnp.take(table, idx, axis=0)
  return table.at[idx].get(out_sharding=jax.sharding.PartitionSpec(
      None, *spec[1:]))


def _set_rows(table: Any, idx: jax.Array, rows: Any) -> jax.Array:
  """``table`` with rows ``idx`` set to ``rows`` (in its dtype), sharded
  as ``table`` under Explicit mesh axes."""
  rows = jnp.asarray(rows).astype(table.dtype)
  spec = jc.type_spec(table)
  ref = table.at[idx]
  if spec is None or "out_sharding" not in inspect.signature(
      ref.set).parameters:  # older jax (0.6) takes none here, nor needs it
    return ref.set(rows, unique_indices=True)
  return ref.set(rows, unique_indices=True,
                 out_sharding=jax.sharding.PartitionSpec(*spec))


def check_indices(who: str, indices: tuple, vocab: int, path: str = "",
                  remedy: str = "") -> None:
  """Raises unless ``indices`` are distinct ids in ``[0, vocab)``."""
  where = f" at {path!r}" if path else ""
  bad = [i for i in indices if not 0 <= i < vocab]
  if bad:
    raise ValueError(
        f"{who}{where}: token ids {bad[:5]} are out of range for a table of "
        f"{vocab} rows (ids must be in [0, {vocab})).{remedy}")
  dups = sorted(i for i, c in collections.Counter(indices).items()
                if c > 1)
  if dups:
    raise ValueError(f"{who}{where}: token ids {dups[:5]} are listed more "
                     f"than once; list each id once.{remedy}")


def is_tokens(x: Any) -> bool:
  return isinstance(x, TrainableTokens)


def token_deltas(delta_tree: Any) -> dict[str, TrainableTokens]:
  """``{path: TrainableTokens}`` for every trainable-token leaf of a delta
  tree."""
  return {p: t for p, t in leaves_with_paths(delta_tree,
                                             is_leaf=is_delta_or_none)
          if isinstance(t, TrainableTokens)}


def make_tokens(params: Any, config: Any, lora_paths: set, dtype_for: Any
                ) -> dict[str, TrainableTokens]:
  """``{path: TrainableTokens}`` for ``config.trainable_tokens``: each regex
  must full-match at least one 2-D float leaf (the table), which must hold
  every id and carry no LoRA adapter; values start as the table's rows."""
  out: dict[str, TrainableTokens] = {}
  leaves = leaves_with_paths(params)
  remedy = (" Fix LoraConfig.trainable_tokens, or exclude the table from "
            "it.")
  for pattern, ids in config.trainable_tokens:
    check_regex_matches(pattern, [p for p, _ in leaves],
                        "LoraConfig.trainable_tokens", "embedding table")
    matched = [(p, x) for p, x in leaves if re.fullmatch(pattern, p)]
    for p, x in matched:
      shape = tuple(getattr(x, "shape", ()))
      if len(shape) != 2 or not is_float(x):
        raise ValueError(
            f"LoraConfig.trainable_tokens[{pattern!r}] matches {p!r} "
            f"(shape {shape}, dtype {getattr(x, 'dtype', None)}), which is "
            f"not a 2-D float embedding table (vocab, dim). Narrow the "
            f"regex to the table.")
      if p in out:
        raise ValueError(
            f"LoraConfig.trainable_tokens: {p!r} is matched by more than one "
            f"regex ({pattern!r} and an earlier one); give its ids in one "
            f"entry.")
      if p in lora_paths:
        raise ValueError(
            f"{p!r} is selected both for a LoRA adapter (targets) and for "
            f"trainable tokens; a table holds one of them. Add it to "
            f"LoraConfig.exclude to train only the tokens, or drop it from "
            f"trainable_tokens.")
      check_indices(f"LoraConfig.trainable_tokens[{pattern!r}]", ids,
                    shape[0], p, remedy)
      if not hasattr(x, "at"):
        raise ValueError(
            f"LoraConfig.trainable_tokens: {p!r} is {type(x).__name__}, not "
            f"an array; trainable tokens start from the table's rows, so "
            f"split a tree of float arrays (a quantized table is not "
            f"supported).")
      rows = jnp.take(x, jnp.asarray(ids, jnp.int32), axis=0)
      out[p] = TrainableTokens(rows.astype(dtype_for(x.dtype)), ids,
                               shape[0])
  return out


def check_table(path: str, table: Any, t: TrainableTokens) -> None:
  """Raises unless ``table`` is the ``(vocab, dim)`` table ``t`` was made
  for."""
  shape = tuple(getattr(table, "shape", ()))
  if shape != t.kernel_shape:
    raise ValueError(
        f"Trainable tokens/base mismatch at {path!r}: the tokens belong to a "
        f"table of shape {t.kernel_shape} (values "
        f"{tuple(t.values.shape)}), the base leaf has shape {shape}. Were "
        f"they trained on another model?")


def original_rows(table: Any, t: TrainableTokens) -> jax.Array:
  """The table's own rows at ``t``'s ids (what :func:`unset` restores)."""
  return _rows(table, jnp.asarray(t.indices, jnp.int32))


def unset(path: str, params_table: Any, t: TrainableTokens,
          rows: Any) -> jax.Array:
  """Undoes :meth:`TrainableTokens.apply`: the ids' rows back to ``rows``
  (the original rows, taken before merging)."""
  if rows is None:
    raise ValueError(
        f"unmerge: {path!r} holds trainable tokens, whose merge overwrote "
        f"the table's rows {t.indices[:5]}; the original rows are needed to "
        f"undo it. Take them before merging and pass them: norms = "
        f"lora_jax.dora_norms(base, delta); lora_jax.unmerge(params, delta, "
        f"norms).")
  rows = jnp.asarray(rows)
  if tuple(rows.shape) != tuple(t.values.shape):
    raise ValueError(
        f"unmerge: the original rows given for {path!r} have shape "
        f"{tuple(rows.shape)}; the tokens need {tuple(t.values.shape)}.")
  idx = jnp.asarray(t.indices, jnp.int32)
  return _set_rows(params_table, idx, rows)
