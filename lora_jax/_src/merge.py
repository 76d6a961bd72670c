"""merge / unmerge: fold adapters into kernels for zero-overhead inference."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_concrete
from lora_jax._src.dora import adapted_weight
from lora_jax._src.dora import norm as dora_norm
from lora_jax._src.dora import unmerged_weight
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.paths import preview
from lora_jax._src.quant import dequantize
from lora_jax._src.sharding import place_like_kernel
from lora_jax._src.stack import refuse_stacks
from lora_jax._src.tokens import TrainableTokens
from lora_jax._src.tokens import check_table
from lora_jax._src.tokens import original_rows
from lora_jax._src.tokens import token_deltas
from lora_jax._src.tokens import unset


def _placed_like(path: str, w: Any, d: LoraDelta) -> LoraDelta:
  """``d`` with its factors on the devices of the concrete kernel ``w``.

  A delta restored without shardings (``lora_jax.load(path)``) sits on one
  device; eager arithmetic with a kernel sharded over a mesh would fail with
  XLA's "incompatible devices". Factors of a kernel with a NamedSharding go
  where lora_jax.delta_shardings puts them; those of a one-device kernel go to
  its device. Under jit the arguments' placement is the caller's.
  """
  factors = [x for x in (d.a, d.b, d.magnitude) if x is not None]
  if not (is_concrete(w) and all(is_concrete(x) for x in factors)):
    return d
  devices = w.sharding.device_set
  if all(x.sharding.device_set == devices for x in factors):
    return d
  if isinstance(w.sharding, NamedSharding):
    return place_like_kernel(w, d)
  if len(devices) == 1:
    put = lambda x: None if x is None else jax.device_put(x, w.sharding)
    return d.replace(a=put(d.a), b=put(d.b), magnitude=put(d.magnitude))
  raise ValueError(
      f"The adapter at {path!r} lives on other devices than its base kernel "
      f"({w.sharding}), and lora_jax places factors only like a "
      f"NamedSharding. Restore the delta onto the base's devices: "
      f"lora_jax.load(path, shardings=lora_jax.delta_shardings(delta, "
      f"jax.tree.map(lambda x: x.sharding, base))).")


def placed_like_base(base: Any, deltas: dict) -> dict:
  """``{path: LoraDelta}`` with every concrete adapter on its concrete base
  kernel's devices (see ``_placed_like``); for engines that take the adapters
  as a dict, after :func:`check_matches`."""
  flat = dict(leaves_with_paths(base))
  return {p: _placed_like(p, flat[p], d) for p, d in deltas.items()}


def _combine(path: str, w: Any, d: LoraDelta, sign: float,
             norm: Any = None) -> jax.Array:
  _check_shape(path, w, d)
  d = _placed_like(path, w, d)
  out = adapted_weight(w, d) if sign > 0 else unmerged_weight(w, d, norm, path)
  # Eagerly computed results keep the base kernel's placement (under jit the
  # compiler propagates it).
  if is_concrete(w) and is_concrete(out) and out.sharding != w.sharding:
    out = jax.device_put(out, w.sharding)
  return out


# How each entry point spells its two trees, for messages about their order.
_CALLS = {"merge": ("base", "merge(base, delta)"),
          "unmerge": ("params", "unmerge(params, delta)"),
          "wrap": ("base", "wrap(fn)(base, delta, *args)"),
          "explain": ("base", "explain(fn, base, delta, *args)")}


def _check_order(flat: dict, deltas: dict, what: str,
                 tokens: dict | None = None) -> None:
  """Raises unless the first tree holds no adapter and the second holds at
  least one: with the two trees swapped (or parameters passed as the delta)
  merge would return its input and wrap the base model, silently."""
  first, call = _CALLS.get(what, ("base", f"{what}(base, delta)"))
  in_base = [p for p, x in flat.items()
             if isinstance(x, (LoraDelta, TrainableTokens))]
  deltas = {**deltas, **(tokens or {})}
  remedy = (f"Call {call}: the {first} (frozen parameters) first, then the "
            f"delta that lora_jax.split returns second (or lora_jax.load "
            f"gives).")
  if in_base and not deltas:
    raise ValueError(
        f"{what}: the arguments look swapped: the {first} (first tree) holds "
        f"LoraDelta adapters at {preview(in_base)} and the delta (second "
        f"tree) holds none. {remedy}")
  if in_base:
    raise ValueError(
        f"{what}: the {first} (first tree) holds LoraDelta adapters at "
        f"{preview(in_base)}; it must be plain parameters. {remedy}")
  if not deltas:
    raise ValueError(
        f"{what}: the delta (second tree) holds no LoraDelta, so there is "
        f"nothing to apply; it looks like parameters or an empty tree. "
        f"{remedy}")


def check_matches(base: Any, deltas: dict, what: str,
                  tokens: dict | None = None) -> None:
  """Raises, naming the leaf, unless the trees come in the right order and
  every adapter fits a base kernel (and, outside unmerge, a principal-init
  adapter its residual base); ``tokens`` (``{path: TrainableTokens}``)
  their tables."""
  flat = dict(leaves_with_paths(base, is_leaf=lambda x: isinstance(
      x, (LoraDelta, TrainableTokens))))
  tokens = tokens or {}
  _check_order(flat, deltas, what, tokens)
  missing = [p for p in [*deltas, *tokens] if p not in flat]
  if missing:
    raise ValueError(
        f"{what}: the delta has adapters at {preview(missing)} but the base "
        f"has no leaf at those paths. Is this the adapter of another model?")
  for path, d in deltas.items():
    _check_shape(path, flat[path], d)
    if what != "unmerge":
      d.check_base(path, flat[path])
  for path, t in tokens.items():
    check_table(path, flat[path], t)


def _check_shape(path: str, w: Any, d: LoraDelta) -> None:
  shape = tuple(getattr(w, "shape", ()))
  try:
    want = d.kernel_shape
  except Exception as e:
    raise ValueError(f"The adapter at {path!r} is malformed: {e}") from None
  if shape != tuple(want):
    raise ValueError(
        f"Adapter/base mismatch at {path!r}: the adapter updates a kernel of "
        f"shape {tuple(want)} (a {tuple(d.a.shape)}, b {tuple(d.b.shape)}), "
        f"the base leaf has shape {shape}. Was the adapter trained on another "
        f"model or config?")


def _apply(params: Any, delta: Any, sign: float, what: str,
           norms: dict | None = None) -> Any:
  first = "base" if what == "merge" else "params"
  refuse_stacks(delta, what, f"{what.capitalize()} one adapter of it: "
                f"lj.{what}({first}, lj.select(stacked, k)); or run each "
                f"adapter on its own rows: lj.wrap(f)(base, stacked, x, "
                f"adapter_ids=ids).")
  deltas = adapters(delta)
  tokens = token_deltas(delta)
  check_matches(params, deltas, what, tokens)
  norms = norms or {}
  params = dequantize(params)  # a quantized base merges into float params

  def one(path, w):
    if path in tokens:
      return tokens[path].apply(w) if sign > 0 else unset(
          path, w, tokens[path], norms.get(path))
    return w if path not in deltas else _combine(
        path, w, deltas[path], sign, norms.get(path))
  return map_with_paths(one, params)


def dora_norms(base: Any, delta: Any) -> dict:
  """What :func:`unmerge` needs to undo a merge exactly: ``{path: ||W0 +
  s*A@B||}`` (per output unit) of every DoRA adapter, and ``{path: rows}``
  (the table's original rows at the ids) of every
  :class:`lora_jax.TrainableTokens`.

  Args:
    base: the base the delta was split from (a quantized base too).
    delta: the delta tree.

  Returns:
    ``{path: array}``; empty when the delta has neither DoRA adapters nor
    trainable tokens.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> base, delta = lj.split({"w": jnp.eye(3) * 2}, lj.LoraConfig(
  ...     rank=1, targets="w", dora=True), jax.random.key(0))
  >>> lj.dora_norms(base, delta)["w"]
  Array([2., 2., 2.], dtype=float32)
  >>> merged = lj.merge(base, delta)
  >>> bool(jnp.allclose(lj.unmerge(merged, delta, lj.dora_norms(base, delta))["w"],
  ...                   base["w"]))
  True
  """
  flat = dict(leaves_with_paths(dequantize(base)))  # a QArray base too
  out = {p: dora_norm(flat[p], d) for p, d in adapters(delta).items()
         if d.magnitude is not None}
  # trainable tokens: the rows their merge overwrites
  out.update((p, original_rows(flat[p], t))
             for p, t in token_deltas(delta).items())
  return out


def merge(base: Any, delta: Any) -> Any:
  """``base`` with ``W0 + scale * a @ b`` at every adapted kernel.

  The result has the structure, dtypes and (for concrete arrays) shardings of
  ``base``; the update is added in the factors' precision and rounded once.
  Adapters are matched to base leaves by path, so a delta loaded with
  :func:`lora_jax.load` merges into the model it was trained on; eagerly, its
  factors are first placed like their kernels (a base sharded over a mesh and
  a delta loaded onto one device merge; under ``jit``, load it with
  ``shardings=lora_jax.delta_shardings(...)``). Swapped trees, a delta without
  any ``LoraDelta``, or a base holding one, are errors.

  Args:
    base: the frozen parameters (from :func:`lora_jax.split`).
    delta: the delta tree (from :func:`lora_jax.split` or
      :func:`lora_jax.load`); leaves without an adapter may be ``None`` or
      absent.

  Returns:
    The merged parameters, ``base``'s structure and dtypes.

  Raises:
    ValueError: the trees look swapped, the delta holds no adapter, an
      adapter's path has no base leaf, or an adapter does not fit its kernel
      (shape, layout, a residual-base mark of another base); each names the
      path.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> base = {"kernel": jnp.zeros((3, 2))}
  >>> d = lj.LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)), scale=2.0,
  ...                  layout=lj.Layout.dense())
  >>> lj.merge(base, {"kernel": d})["kernel"]
  Array([[2., 2.],
         [2., 2.],
         [2., 2.]], dtype=float32)
  """
  return _apply(base, delta, 1.0, "merge")


def unmerge(params: Any, delta: Any, norms: dict | None = None) -> Any:
  """Inverse of :func:`merge`: subtracts ``scale * a @ b`` again.

  Exact up to float rounding (two roundings into the base dtype). DoRA
  adapters and trainable tokens (whose merge overwrote rows) also need
  ``norms = dora_norms(base, delta)``, taken before merging.

  Args:
    params: merged parameters (from :func:`merge`).
    delta: the delta that was merged.
    norms: :func:`dora_norms` of the base and delta, for DoRA adapters and
      trainable tokens.

  Returns:
    The base parameters, up to float rounding.

  Raises:
    ValueError: as :func:`merge`, or a DoRA adapter / trainable tokens
      without their entry in ``norms``.

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> d = {"kernel": lj.LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)))}
  >>> base = {"kernel": jnp.zeros((3, 2))}
  >>> float(abs(lj.unmerge(lj.merge(base, d), d)["kernel"]).max())
  0.0
  """
  return _apply(params, delta, -1.0, "unmerge", norms)
