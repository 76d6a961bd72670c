"""Many adapters on one base: a stack of adapters is one pytree.

``stack`` puts adapters of one model side by side along a leading adapter
axis (ranks zero-padded to the largest, each adapter's scale static, as a
single adapter's), ``select`` takes one back out, ``put`` swaps one in, and
``lj.wrap(f)(base, stacked, *args, adapter_ids=ids)`` runs every row of a
batch with its own adapter in one pass (``mixed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import check_same_kernel
from lora_jax._src.delta import describe_array
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.delta import pytree_node
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.tokens import token_deltas


@dataclasses.dataclass(frozen=True)
class StackInfo:
  """Per-adapter metadata of a stack that no computation depends on: the
  true rank of each adapter (its factors are zero-padded beyond it).

  Every ``StackInfo`` compares equal to every other, so a stack's treedef
  does not change when an adapter of a smaller rank is ``put`` into a slot:
  a jitted function over the stack does not retrace.
  """
  ranks: tuple[int, ...] = ()

  def __eq__(self, other):
    return isinstance(other, StackInfo)

  def __hash__(self):
    return hash(StackInfo)


def _scales(scale: Any) -> tuple[float, ...]:
  """``scale`` (a sequence of numbers or a concrete 1-D array) as a tuple of
  Python floats."""
  if isinstance(scale, jax.core.Tracer):
    raise TypeError(
        "LoraStack: scale is static (one Python float per adapter, as a "
        "LoraDelta's scale), not a traced value; got a tracer. Build stacks "
        "with lj.stack.")
  values = np.asarray(scale, np.float64) if hasattr(scale, "shape") else (
      np.asarray(list(scale), np.float64))
  return tuple(float(v) for v in values.reshape(-1))


@pytree_node(children=("a", "b", "magnitude"),
             static=("scale", "layout", "dropout", "info", "residual_of"))
@dataclasses.dataclass(frozen=True)
class LoraStack:
  """``n`` adapters of one kernel, stacked along a leading adapter axis.

  Children: ``a``, ``b``, ``magnitude`` (data: an optimiser trains them).
  The other fields are static (``scale`` as a :class:`lora_jax.LoraDelta`'s:
  never trained, the same in a stack and in its gradient); putting an
  adapter of another scale into a slot changes them (a jitted function
  retraces once, as for a single adapter).

  Attributes:
    a: shape ``(n, *batch, *in, R)``, ``R`` the largest rank, smaller ones
      zero-padded.
    b: shape ``(n, *batch, R, *out)``.
    scale: one Python float per adapter.
    magnitude: DoRA only: shape ``(n, *batch, *out)``; else None.
    layout: the kernel's layout, shared by the adapters.
    dropout: LoRA dropout, shared.
    info: a ``StackInfo``: each adapter's own rank.
    residual_of: each adapter's residual-base mark (PiSSA / OLoRA), ``()``
      when none has one.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d1 = lj.LoraDelta(jnp.ones((4, 1)), jnp.ones((1, 3)), scale=2.0)
  >>> d2 = lj.LoraDelta(jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5)
  >>> s = lj.stack([{"w": d1}, {"w": d2}])["w"]
  >>> s
  LoraStack(n=2, ranks=(1, 2), kernel=(4, 3), a=f32[2,4,2], b=f32[2,2,3], scales=(2, 0.5))
  >>> s.scale
  (2.0, 0.5)
  """
  a: Any
  b: Any
  scale: tuple[float, ...]
  magnitude: Any = None
  layout: Layout = Layout.dense()
  dropout: float = 0.0
  info: StackInfo = StackInfo()
  residual_of: tuple = ()  # principal inits only: one mark (or None) each

  def __post_init__(self):
    object.__setattr__(self, "scale", _scales(self.scale))
    n = getattr(self.a, "shape", (None,))[0]
    if n is not None and len(self.scale) != n:
      raise ValueError(f"LoraStack: {n} adapters but {len(self.scale)} "
                       f"scales {self.scale}; give one scale per adapter.")
    marks = tuple(self.residual_of or ())
    object.__setattr__(self, "residual_of",
                       () if all(m is None for m in marks) else marks)

  @property
  def size(self) -> int:
    """Number of adapters."""
    return self.a.shape[0]

  @property
  def rank(self) -> int:
    """The padded rank ``R``."""
    return self.a.shape[-1]

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    return self.layout.kernel_shape(self.a.shape[1:], self.b.shape[1:])

  def __repr__(self) -> str:
    try:
      head = (f"n={self.size}, ranks={self.info.ranks}, "
              f"kernel={self.kernel_shape}, ")
    except (AttributeError, TypeError, ValueError, IndexError):  # placeholder children
      head = ""
    scales = ", ".join(f"{v:g}" for v in self.scale)
    return (f"LoraStack({head}a={describe_array(self.a)}, "
            f"b={describe_array(self.b)}, scales=({scales}))")

  def scales(self, dtype: Any = jnp.float32) -> jax.Array:
    """The adapters' scales as an ``(n,)`` array (a constant under ``jit``:
    the scales are static)."""
    return jnp.asarray(self.scale, dtype)

  def mark(self, k: int):
    """Adapter ``k``'s residual-base mark (PiSSA / OLoRA), or None."""
    return self.residual_of[k] if self.residual_of else None

  def rows(self, ids, base_norm=None) -> tuple:
    """``(a, b, scale, magnitude)`` of adapters ``ids`` (an int array of any
    shape, traced or not; the results gain its axes in front).

    Index ``-1`` gives the base model: zero factors, scale 0 and, with DoRA,
    ``base_norm`` (``||W0||`` per output unit) as the magnitude, so nothing
    of any adapter (not even a non-finite value) reaches that row. Any
    other index outside ``[0, n)`` (possible only under ``jit``, where
    ``wrap`` cannot check the ids) gives a NaN scale: its rows come out NaN
    on every path, never as another adapter's or the base model's answer.
    """
    ids = jnp.asarray(ids)
    ok = (ids >= 0) & (ids < self.size)
    i = jnp.clip(ids, 0, self.size - 1)

    def take(v):
      got = _gather_rows(v, i)
      mask = _expand(ok, got.ndim)
      return jnp.where(mask, got, jnp.zeros((), got.dtype))
    dtype = jnp.float32
    scale = jnp.where(ok, _gather_rows(self.scales(dtype), i), jnp.where(
        ids == -1, jnp.zeros((), dtype), jnp.full((), jnp.nan, dtype)))
    magnitude = None
    if self.magnitude is not None:  # -1 without base_norm: NaN, not a guess
      got = _gather_rows(self.magnitude, i)
      mask = _expand(ok, got.ndim)
      other = (jnp.full((), jnp.nan, got.dtype) if base_norm is None
               else jc.reshard_like(base_norm.astype(got.dtype), got))
      magnitude = jnp.where(mask, got, other)
    return take(self.a), take(self.b), scale, magnitude

  def row(self, index, base_norm=None) -> LoraDelta:
    """The adapter at ``index`` (an int or a traced int) as a
    :class:`LoraDelta` of the padded rank, its scale as a float32 array
    (see :meth:`rows` for ``-1``, out-of-range indices and ``base_norm``)."""
    a, b, scale, magnitude = self.rows(index, base_norm)
    return LoraDelta(a, b, scale=scale, layout=self.layout,
                     magnitude=magnitude, dropout=self.dropout)


  def row_of_all(self, index) -> LoraDelta:
    """The adapter at ``index`` as one :class:`LoraDelta` over *all* the
    stack's factors: ``a`` and ``b`` concatenated along the rank (rank
    ``n * R``) with a per-rank scale vector that is the adapter's scale on
    its own ``R`` columns and zero elsewhere (zero everywhere for ``-1``).

    Under ``vmap`` over rows only the scale vector is per row: ``x @ a`` and
    ``t @ b`` stay single matmuls shared by the rows (a one-hot
    contraction), where :meth:`row` gathers each row's factors and batches
    the matmuls. Costs ``n`` times the rank, so it pays for small stacks
    (``per_row`` picks). Not for DoRA (its norm is per adapter)."""
    n, r, nb = self.size, self.rank, len(self.layout.batch)
    a = jnp.moveaxis(self.a, 0, -2)
    a = a.reshape(*a.shape[:-2], n * r)
    b = jnp.moveaxis(self.b, 0, nb)
    b = b.reshape(*b.shape[:nb], n * r, *b.shape[nb + 2:])
    pick = jax.nn.one_hot(index, n, dtype=jnp.float32) * self.scales()
    valid = (index >= -1) & (index < n)  # outside: NaN, as in rows()
    pick = jnp.where(valid, pick, jnp.full((), jnp.nan, pick.dtype))
    # a per-rank scale vector (data): this row-of-all adapter is only ever
    # an engine operand, never trained or saved
    return LoraDelta(a, b, scale=jnp.repeat(pick, r),  # type: ignore[arg-type]
                     layout=self.layout,
                     dropout=self.dropout)


def _expand(ok: Any, ndim: int) -> Any:
  """``ok`` with trailing unit axes up to ``ndim``, to select whole rows; a
  scalar as it is (JAX 0.6's select under Explicit mesh axes takes a scalar
  or a mask sharded as the values, not unit axes)."""
  return ok if ok.ndim == 0 else jnp.reshape(ok, ok.shape + (1,) * (
      ndim - ok.ndim))


def _gather_rows(v: Any, i: Any) -> Any:
  """``v[i]`` (``i`` an int array, its axes in front of ``v``'s others).

  Under Explicit mesh axes JAX asks such a gather for its out_sharding when
  the ids are sharded (a batch on ``"data"``, or each row under ``vmap``
  over a sharded batch): the result keeps the ids' sharding on their axes
  and ``v``'s on the rest, except for a mesh axis the ids already use (a
  factor axis FSDP-sharded on ``"data"`` beside rows on ``"data"``), which
  is left replicated there."""
  si, sv = jc.type_spec(i), jc.type_spec(v)
  if si is None and sv is None:
    return v[i]
  si = si or (None,) * jnp.ndim(i)
  sv = sv or (None,) * v.ndim
  used = {a for e in si for a in _mesh_axes(e)}
  rest = [None if used & set(_mesh_axes(e)) else e for e in sv[1:]]
  if jnp.ndim(i) == 0:
    # one id (a row under vmap): gathered as a one-element array, whose
    # batching keeps the rows' sharding (JAX's scalar-index path, a
    # dynamic_slice, loses the out_sharding when vmapped)
    return v.at[i[None]].get(out_sharding=jax.sharding.PartitionSpec(
        None, *rest))[0]
  return v.at[i].get(out_sharding=jax.sharding.PartitionSpec(*si, *rest))


def _mesh_axes(entry: Any) -> tuple:
  """The mesh axes of one PartitionSpec entry."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def is_stack_or_none(x: Any) -> bool:
  return x is None or isinstance(x, (LoraDelta, LoraStack))


def stacks(tree: Any) -> dict[str, LoraStack]:
  """``{path: LoraStack}`` of a stacked delta tree."""
  from lora_jax._src.paths import leaves_with_paths
  return {p: s for p, s in leaves_with_paths(tree, is_leaf=is_stack_or_none)
          if isinstance(s, LoraStack)}


def _pad_rank(d: LoraDelta, rank: int):
  nb = len(d.layout.batch)
  extra = rank - d.rank
  a = jnp.pad(d.a, [(0, 0)] * (d.a.ndim - 1) + [(0, extra)])
  b = jnp.pad(d.b, [(0, 0)] * nb + [(0, extra)] + [(0, 0)] * (d.b.ndim - nb - 1))
  return a, b


def _mark_text(d: LoraDelta) -> str:
  m = d.residual_of
  if m is None:
    return "is a plain adapter (for the original weights)"
  return (f"was made with init={m.init!r} (for its residual base, ||W|| "
          f"{m.residual_norm:.6g})")


def _check_compatible(who: str, path: str, ds: Sequence[LoraDelta],
                      numbers: Sequence[int] | None = None):
  """Raises, naming the path, unless adapters ``ds`` (numbered ``numbers``,
  default 0, 1, ...) can share one stack: one kernel, DoRA or not, one
  dropout, one base kernel (the same residual-base mark, or none)."""
  numbers = list(numbers or range(len(ds)))
  first, j = ds[0], numbers[0]
  for k, d in zip(numbers[1:], ds[1:], strict=True):
    check_same_kernel(who, "adapter", k, path, d, first,
                      "A stack holds adapters of one model.")
    if (d.magnitude is None) != (first.magnitude is None):
      raise ValueError(f"{who}: at {path!r} some adapters are DoRA and "
                       f"some are not; stack them separately.")
    if d.dropout != first.dropout:
      raise ValueError(f"{who}: at {path!r} adapters have different "
                       f"dropout ({first.dropout} vs {d.dropout}).")
    if d.residual_of != first.residual_of:
      raise ValueError(
          f"{who}: at {path!r} adapter {k} {_mark_text(d)} and adapter {j} "
          f"{_mark_text(first)}: they belong with different base kernels, "
          f"and a stack runs on one base. Stack principal-init adapters made "
          f"on one residual base (one config), or convert each with "
          f"lj.to_plain_lora(initial_delta, delta) and stack those on the "
          f"original weights.")


def _index(who: str, k: Any, n: int) -> int:
  """``k`` as an index in ``[0, n)`` (negative ones count from the end)."""
  try:
    i = operator.index(k)
  except TypeError:
    raise TypeError(f"{who}: the adapter index must be a Python int (or a "
                    f"concrete integer), got {k!r}.") from None
  if not -n <= i < n:
    raise IndexError(f"{who}: adapter index {i} is out of range for a stack "
                     f"of {n} adapters: valid indices are 0..{n - 1} (or "
                     f"-{n}..-1 from the end).")
  return i % n


def refuse_stacks(tree: Any, who: str, remedy: str) -> None:
  """Raises a ValueError saying so if ``tree`` holds a :class:`LoraStack`
  where a single adapter is expected (``remedy``: what to call instead)."""
  found = stacks(tree)
  if found:
    raise ValueError(
        f"{who}: the delta holds a stack of adapters (lj.stack) at "
        f"{preview(found)}, where single adapters (LoraDelta) are expected. "
        f"{remedy}")


def check_stack_bases(base: Any, stacked: Any) -> None:
  """Raises unless ``base`` can be the base of every principal-init (PiSSA /
  OLoRA) adapter in the stacks of ``stacked``, as
  :meth:`lora_jax.LoraDelta.check_base` for one adapter (only a concrete
  kernel can be checked)."""
  found = {p: s for p, s in stacks(stacked).items() if s.residual_of}
  if not found:
    return
  flat = dict(leaves_with_paths(base))
  for p, s in found.items():
    seen = set()
    for k, mark in enumerate(s.residual_of):
      if mark is not None and mark not in seen and p in flat:
        seen.add(mark)
        LoraDelta(s.a[k], s.b[k], layout=s.layout, residual_of=mark
                  ).check_base(p, flat[p], f"Adapter {k} of the stack")


def stack(deltas: Sequence[Any]) -> Any:
  """One delta tree holding ``deltas`` along a leading adapter axis.

  Args:
    deltas: delta trees of one model (from :func:`lora_jax.split` or
      :func:`lora_jax.load`), adapting the same paths; ranks and scales may
      differ. Stacks do not nest: a stack among ``deltas`` is an error.

  Returns:
    The first delta's structure with a :class:`LoraStack` at each adapted
    path.

  Raises:
    ValueError: no deltas, a delta without adapters or with other paths, a
      stack among them, trainable tokens, or adapters of one path that do
      not fit together (kernel, layout, DoRA, dropout); each names the path
      and the adapter.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"w": jnp.ones((6, 4))}
  >>> ds = [lj.split(params, lj.LoraConfig(rank=r, targets="w"),
  ...                jax.random.key(r))[1] for r in (2, 4)]
  >>> lj.stack(ds)["w"].a.shape
  (2, 6, 4)
  """
  deltas = list(deltas)
  if not deltas:
    raise ValueError("lj.stack needs at least one delta.")
  for k, d in enumerate(deltas):
    nested = stacks(d)
    if nested:
      raise ValueError(
          f"lj.stack: delta {k} holds a stack of adapters (a LoraStack at "
          f"{preview(nested)}); stacks do not nest. Stack single adapters: "
          f"lj.stack([lj.select(stacked, i) for i in range(n)] + [delta, "
          f"...]).")
    held = token_deltas(d)
    if held:
      raise ValueError(
          f"lj.stack: delta {k} holds trainable tokens at {preview(held)}, "
          f"which stacks do not carry (each adapter would set the table's "
          f"rows its own way). Stack the LoRA adapters without them, or "
          f"merge the tokens into the base first: lj.merge(base, "
          f"{{path: tokens}}).")
  flat = [adapters(d) for d in deltas]
  paths = list(flat[0])
  if not paths:
    raise ValueError("lj.stack: delta 0 holds no adapter (LoraDelta); stack "
                     "delta trees from lj.split or lj.load.")
  for k, f in enumerate(flat[1:], 1):
    if list(f) != paths:
      raise ValueError(
          f"lj.stack: delta {k} adapts {preview(f)}, delta 0 adapts "
          f"{preview(paths)}; every delta must adapt the same paths.")
  stacked = {}
  for path in paths:
    ds = [f[path] for f in flat]
    _check_compatible("lj.stack", path, ds)
    rank = max(d.rank for d in ds)
    padded = [_pad_rank(d, rank) for d in ds]
    dtype = jnp.result_type(*(d.a.dtype for d in ds))
    mags = [d.magnitude for d in ds]
    stacked[path] = LoraStack(
        a=jnp.stack([a.astype(dtype) for a, _ in padded]),
        b=jnp.stack([b.astype(dtype) for _, b in padded]),
        scale=tuple(float(d.scale) for d in ds),
        magnitude=None if mags[0] is None else jnp.stack(mags),
        layout=ds[0].layout, dropout=ds[0].dropout,
        info=StackInfo(tuple(int(d.rank) for d in ds)),
        residual_of=tuple(d.residual_of for d in ds))
  return map_with_paths(lambda p, d: stacked.get(p) if isinstance(
      d, LoraDelta) else d, deltas[0], is_leaf=is_delta_or_none)


def _adapter(s: LoraStack, k: int) -> LoraDelta:
  """Adapter ``k`` (in ``[0, n)``) of ``s`` at its own rank: what the stack
  computes for it (its static scale, its residual-base mark)."""
  r = s.info.ranks[k] if s.info.ranks else s.rank
  nb = len(s.layout.batch)
  b = jax.lax.slice_in_dim(s.b[k], 0, r, axis=nb)
  return LoraDelta(s.a[k][..., :r], b, scale=s.scale[k], layout=s.layout,
                   magnitude=None if s.magnitude is None else s.magnitude[k],
                   dropout=s.dropout, residual_of=s.mark(k))


def select(stacked: Any, k: int) -> Any:
  """Adapter ``k`` of a stack, as a plain delta tree.

  The adapter comes back at its own rank, with its scale and, for PiSSA /
  OLoRA, its residual-base mark; single adapters shared by every row stay
  as they are.

  Args:
    stacked: a delta tree holding :class:`lora_jax.LoraStack` nodes (from
      :func:`lora_jax.stack`).
    k: the adapter's index; negative counts from the end.

  Returns:
    A delta tree of :class:`lora_jax.LoraDelta` nodes.

  Raises:
    TypeError: ``k`` is not an integer.
    IndexError: ``k`` is outside the stack.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"w": jnp.ones((6, 4))}
  >>> ds = [lj.split(params, lj.LoraConfig(rank=r, targets="w"),
  ...                jax.random.key(r))[1] for r in (2, 4)]
  >>> back = lj.select(lj.stack(ds), 0)["w"]
  >>> back.rank, bool((back.a == ds[0]["w"].a).all())
  (2, True)
  """
  def one(s):
    if not isinstance(s, LoraStack):
      return s
    return _adapter(s, _index("lj.select", k, s.size))
  return jax.tree.map(one, stacked, is_leaf=is_stack_or_none)


def put(stacked: Any, k: int, delta: Any) -> Any:
  """``stacked`` with adapter ``k`` replaced by ``delta``.

  Pure, and the shapes stay, so a jitted function over the stack does not
  retrace unless ``delta``'s scale differs from the slot's (scales are
  static, as a single adapter's).

  Args:
    stacked: a stacked delta tree.
    k: the slot; negative counts from the end.
    delta: a delta of single adapters at the stack's paths, of rank at most
      the stack's padded rank, for the same kernels.

  Returns:
    The new stacked delta tree.

  Raises:
    TypeError: ``k`` is not an integer.
    IndexError: ``k`` is outside the stack.
    ValueError: ``delta`` adapts other paths, is itself a stack, has a
      larger rank, another kernel or layout, or differs in DoRA.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"w": jnp.ones((6, 4))}
  >>> ds = [lj.split(params, lj.LoraConfig(rank=2, targets="w"),
  ...                jax.random.key(i))[1] for i in range(3)]
  >>> s = lj.put(lj.stack(ds[:2]), 1, ds[2])
  >>> bool((lj.select(s, 1)["w"].a == ds[2]["w"].a).all())
  True
  """
  new = adapters(delta)
  have = stacks(stacked)
  refuse_stacks(delta, "lj.put", "Put one adapter: lj.put(stacked, k, "
                "lj.select(other, i)).")
  if set(new) != set(have):
    raise ValueError(f"lj.put: the delta adapts {preview(new)}, the stack "
                     f"{preview(have)}.")

  def one(path, s):
    if not isinstance(s, LoraStack):
      return s
    i = _index("lj.put", k, s.size)
    d = new[path]
    if s.size > 1:  # the new adapter must fit the others' base
      j = 1 if i == 0 else 0
      _check_compatible("lj.put", path, [_adapter(s, j), d], [j, i])
    else:
      check_same_kernel("lj.put", "adapter", i, path, d, _adapter(s, 0),
                        "A stack holds adapters of one model.")
      if (d.magnitude is None) != (s.magnitude is None):
        raise ValueError(f"lj.put: at {path!r} the stack is "
                         f"{'' if s.magnitude is not None else 'not '}DoRA "
                         f"and the adapter is "
                         f"{'' if d.magnitude is not None else 'not '}DoRA.")
    if d.rank > s.rank:
      raise ValueError(
          f"lj.put: the adapter at {path!r} has rank {d.rank}, more than the "
          f"stack's padded rank {s.rank}. Stack it anew with lj.stack.")
    a, b = _pad_rank(d, s.rank)
    ranks = list(s.info.ranks) or [s.rank] * s.size
    ranks[i] = int(d.rank)
    scales = list(s.scale)
    scales[i] = float(d.scale)
    marks = list(s.residual_of) or [None] * s.size
    marks[i] = d.residual_of
    return dataclasses.replace(
        s, a=s.a.at[i].set(a.astype(s.a.dtype)),
        b=s.b.at[i].set(b.astype(s.b.dtype)), scale=tuple(scales),
        magnitude=None if s.magnitude is None
        else s.magnitude.at[i].set(d.magnitude),
        dropout=d.dropout if s.size == 1 else s.dropout,
        info=StackInfo(tuple(ranks)), residual_of=tuple(marks))
  return map_with_paths(one, stacked, is_leaf=is_stack_or_none)
