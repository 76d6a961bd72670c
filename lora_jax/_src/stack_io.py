"""Saving and loading a stack of adapters (:func:`lora_jax.stack`).

A stack is written as one adapter checkpoint (``checkpoint_folder.py``'s
kill-safe folder protocol and ``checkpoint.py``'s validation: a save killed at
any moment leaves the old or the new stack): at each stacked path the factors are stored as they are, padding
included, described as the update of a kernel with one more leading batch
axis (the adapter axis); single adapters shared by every row (a plain
``LoraDelta`` beside the stacks, which ``wrap`` accepts) are stored as
``lora_jax.save`` stores them, and extras (trained base leaves) too.
``lora_jax.json`` gains a ``"stack"`` entry naming the stacked paths, with
each adapter's own metadata: its rank, exact scale (and, for older readers,
its float32 value), residual-base mark, and config. ``lora_jax.load``
refuses such a folder and names :func:`load_stack`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from lora_jax._src import checkpoint
from lora_jax._src import checkpoint_folder
from lora_jax._src.checkpoint import CheckpointError
from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import ResidualMark
from lora_jax._src.delta import adapters
from lora_jax._src.layouts import Layout
from lora_jax._src.stack import LoraStack
from lora_jax._src.stack import StackInfo
from lora_jax._src.stack import stacks


def _with_adapter_axis(layout: Layout) -> Layout:
  """``layout`` of a kernel, for the same kernel with a leading adapter axis."""
  up = lambda axes: tuple(a + 1 for a in axes)
  return Layout((0,) + up(layout.batch), up(layout.inputs), up(layout.outputs))


def _as_delta(s: LoraStack) -> LoraDelta:
  # The stacked factors are exactly rank-R factors of an (n, *kernel) kernel.
  return LoraDelta(s.a, s.b, scale=1.0, layout=_with_adapter_axis(s.layout),
                   magnitude=s.magnitude, dropout=s.dropout)


def _configs(configs: Any, n: int) -> list:
  if configs is None or isinstance(configs, LoraConfig):
    return [configs] * n
  configs = list(configs)
  if len(configs) != n or not all(
      c is None or isinstance(c, LoraConfig) for c in configs):
    raise ValueError(
        f"lora_jax.save_stack: configs must be None, one LoraConfig, or a "
        f"list of {n} (one per adapter, None allowed); got {configs!r}.")
  return configs


def save_stack(directory: str | os.PathLike, stacked: Any,
               configs: Any = None, *, extras: dict | None = None,
               overwrite: bool = False) -> str:
  """Saves a stack of adapters, each with its own rank, scale and config.

  The factors are saved as they are (padding included), so
  :func:`load_stack` gives back the stack bit for bit; so are single
  adapters beside the stacks (shared by every row in ``wrap``).

  Args:
    directory: the checkpoint folder (``~`` is expanded).
    stacked: a delta tree from :func:`lora_jax.stack` (or ``put``), with
      plain :class:`lora_jax.LoraDelta` adapters beside the stacks allowed.
    configs: None, one :class:`lora_jax.LoraConfig` for every adapter, or a
      list with one per adapter (None allowed).
    extras: ``{path: array}`` of trained base leaves, as for
      :func:`lora_jax.save`; :func:`lora_jax.load_extras` reads them back.
    overwrite: replace an existing lora_jax checkpoint (see
      :func:`lora_jax.save`).

  Returns:
    The absolute path written.

  Raises:
    FileExistsError, OSError: as :func:`lora_jax.save`.
    TypeError: an extra that is not a concrete array.
    ValueError: a delta without stacks, or configs that do not match the
      stack.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> params = {"w": jnp.ones((6, 4))}
  >>> cfgs = [lj.LoraConfig(rank=r, targets="w") for r in (2, 4)]
  >>> ds = [lj.split(params, c, jax.random.key(0))[1] for c in cfgs]
  >>> path = lj.save_stack(os.path.join(tempfile.mkdtemp(), "s"),
  ...                      lj.stack(ds), cfgs)
  >>> back, configs = lj.load_stack(path, return_configs=True)
  >>> back["w"].info.ranks, configs[1].rank
  ((2, 4), 4)
  """
  found = stacks(stacked)
  if not found:
    raise ValueError("lora_jax.save_stack: the tree holds no LoraStack (make "
                     "one with lora_jax.stack); save a single adapter with "
                     "lora_jax.save.")
  sizes = {p: s.size for p, s in found.items()}
  n = next(iter(sizes.values()))
  if len(set(sizes.values())) != 1:
    raise ValueError(f"lora_jax.save_stack: the stacks hold different numbers "
                     f"of adapters: {sizes}.")
  configs = _configs(configs, n)
  extras = dict(extras or {})
  for p, x in extras.items():
    checkpoint.check_extra(p, x, "lora_jax.save_stack")
  shared = adapters(stacked)  # single adapters beside the stacks
  deltas = {**shared, **{p: _as_delta(s) for p, s in found.items()}}
  meta = checkpoint.metadata(checkpoint_folder.nest(deltas))
  per_adapter = []
  for k in range(n):
    paths = {}
    for p, s in found.items():
      paths[p] = {"rank": int(s.info.ranks[k]) if s.info.ranks
                  else int(s.rank), "scale": float(s.scale[k]),
                  "scale_data": float(np.float32(s.scale[k]))}
      if s.mark(k) is not None:
        paths[p]["residual_of"] = s.mark(k).to_json()
    per_adapter.append({
        "config": None if configs[k] is None else configs[k].to_json(),
        "paths": paths})
  meta["stack"] = {
      "size": n,
      "scale_dtype": {p: "float32" for p in found},
      "layouts": {p: s.layout.to_json() for p, s in found.items()},
      "adapters": per_adapter}
  meta["extras"] = {p: checkpoint.array_info(x) for p, x in extras.items()}
  arrays = {"adapters": checkpoint_folder.nest(
      {p: checkpoint.factors(d) for p, d in deltas.items()})}
  if extras:
    arrays["extras"] = checkpoint_folder.nest(extras)
  return checkpoint_folder.write(directory, meta, arrays, overwrite)


def _bad(folder: str, what: str) -> CheckpointError:
  return CheckpointError(f"lora_jax.load_stack: the stack description in "
                         f"{os.path.join(folder, checkpoint_folder.META_FILE)} is "
                         f"corrupt: {what}.")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_stack(folder: str, meta: dict) -> dict:
  """The ``"stack"`` entry, checked against the arrays' description."""
  info = meta["stack"]
  if not isinstance(info, dict) or not _is_int(info.get("size")) or (
      info["size"] < 1):
    raise _bad(folder, f"'stack' must hold a positive 'size', got {info!r}")
  n = info["size"]
  # the stacked paths; the checkpoint's other adapters are shared ones
  paths = set(info["layouts"]) if isinstance(info.get("layouts"), dict) else (
      None)
  if not paths or not paths <= set(meta["adapters"]):
    raise _bad(folder, f"stack.layouts must name some of the adapters' paths "
                       f"{sorted(meta['adapters'])}")
  if not isinstance(info.get("scale_dtype"), dict) or (
      set(info["scale_dtype"]) != paths):
    raise _bad(folder, f"stack.scale_dtype must name the paths "
                       f"{sorted(paths)}")
  for p in paths:
    entry = meta["adapters"][p]
    try:
      layout = Layout.from_json(info["layouts"][p])
      np.dtype(info["scale_dtype"][p])
    except (TypeError, ValueError) as e:
      raise _bad(folder, f"stack at {p!r}: {e}") from None
    if (_with_adapter_axis(layout).to_json() != entry["layout"]
        or entry["a"]["shape"][:1] != [n]):
      raise _bad(folder, f"the arrays at {p!r} are not {n} adapters of "
                         f"layout {layout}")
  listed = info.get("adapters")
  if not isinstance(listed, list) or len(listed) != n:
    raise _bad(folder, f"stack.adapters must list {n} adapters")
  for k, a in enumerate(listed):
    if not isinstance(a, dict) or not isinstance(a.get("paths"), dict) or (
        set(a["paths"]) != paths):
      raise _bad(folder, f"stack.adapters[{k}] must describe the paths "
                         f"{sorted(paths)}")
    for p, entry in a["paths"].items():
      padded = meta["adapters"][p]["rank"]
      ok = isinstance(entry, dict) and _is_int(entry.get("rank")) and (
          0 <= entry["rank"] <= padded) and _is_number(entry.get("scale")) and (
              _is_number(entry.get("scale_data")))
      if not ok:
        raise _bad(folder, f"stack.adapters[{k}].paths[{p!r}] must hold a "
                           f"rank in 0..{padded}, a scale and a scale_data; "
                           f"got {entry!r}")
      if entry.get("residual_of") is not None:
        try:
          ResidualMark.from_json(entry["residual_of"])
        except ValueError as err:
          raise _bad(folder, f"stack.adapters[{k}].paths[{p!r}]: "
                             f"{err}") from None
    if not isinstance(a.get("config"), (dict, type(None))):
      raise _bad(folder, f"stack.adapters[{k}].config must be an object or "
                         f"null")
  return info


def _scale(entry: dict, dtype: str) -> float:
  """An adapter's static scale: its exact ``scale``, unless ``scale_data``
  (what the computation used) differs from it in ``dtype``. That happens
  only for stacks saved by lora_jax versions whose stacks trained their
  scales; their computation is kept."""
  exact, data = entry["scale"], entry["scale_data"]
  if np.asarray(exact, dtype) == np.asarray(data, dtype):
    return float(exact)
  return float(data)


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig)
                           if f.init)


def _check_overrides(overrides: dict, return_configs: bool) -> None:
  unknown = sorted(set(overrides) - _CONFIG_FIELDS)
  if unknown:
    raise TypeError(
        f"lora_jax.load_stack got unexpected keyword arguments {unknown}; "
        f"besides shardings and return_configs it takes LoraConfig fields "
        f"({', '.join(sorted(_CONFIG_FIELDS))}) to set in the configs it "
        f"returns.")
  if overrides and not return_configs:
    raise TypeError(
        f"lora_jax.load_stack: {sorted(overrides)} set fields of the configs "
        f"it returns; pass return_configs=True too.")


def load_stack(directory: str | os.PathLike, *, shardings: Any = None,
               return_configs: bool = False, **overrides: Any) -> Any:
  """Restores a stack saved by :func:`save_stack`, bit for bit.

  Args:
    directory: the checkpoint folder (``~`` is expanded).
    shardings: a stack-like tree with, at each adapted path, a
      :class:`lora_jax.LoraStack` (or, for a shared adapter, a
      :class:`lora_jax.LoraDelta`) whose children are shardings (e.g.
      ``jax.tree.map(lambda x: x.sharding, stacked)``): each factor is
      restored straight onto its placement; None for default placement.
    return_configs: also return the list of per-adapter configs (None where
      none was saved).
    **overrides: config fields to set instead of the recorded ones, in every
      adapter's config (as :func:`lora_jax.load_config` takes them); needed
      for a callable ``targets`` / ``exclude`` / ``init``, which JSON cannot
      hold: ``load_stack(path, return_configs=True, targets=my_fn)``.

  Returns:
    A nested dict with a :class:`lora_jax.LoraStack` at each stacked path
    (each adapter's exact scale in ``.scale``, its rank in ``.info.ranks``)
    and a :class:`lora_jax.LoraDelta` at each shared one; with
    ``return_configs``, ``(stacked, configs)``. Extras saved with the stack
    are read by :func:`lora_jax.load_extras`.

  Raises:
    FileNotFoundError, CheckpointError: as :func:`lora_jax.load`; also a
      checkpoint that holds no stack.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> params = {"w": jnp.ones((6, 4))}
  >>> ds = [lj.split(params, lj.LoraConfig(rank=2, alpha=a, targets="w"),
  ...                jax.random.key(0))[1] for a in (1.0, 3.0)]
  >>> path = lj.save_stack(os.path.join(tempfile.mkdtemp(), "s"), lj.stack(ds))
  >>> lj.load_stack(path)["w"].scale
  (0.5, 1.5)
  """
  _check_overrides(overrides, return_configs)
  folder, meta = checkpoint.read_meta(directory)
  if "stack" not in meta:
    raise CheckpointError(
        f"lora_jax.load_stack: {folder} holds one adapter, not a stack; read "
        f"it with lora_jax.load (lora_jax.stack([...]) makes a stack of "
        f"loaded adapters).")
  info = _check_stack(folder, meta)
  targets = {} if shardings is None else {**adapters(shardings),
                                          **stacks(shardings)}
  restored = checkpoint.restore(folder, meta, targets)["adapters"]
  per = info["adapters"]
  flat: dict[str, Any] = {}
  for path, entry in meta["adapters"].items():
    node = checkpoint_folder.lookup(restored, path)
    if path not in info["layouts"]:  # a single adapter shared by every row
      flat[path] = checkpoint.delta_from_meta(node, entry)
      continue
    own = [a["paths"][path] for a in per]
    marks = [e.get("residual_of") for e in own]
    flat[path] = LoraStack(
        a=node["a"], b=node["b"],
        scale=tuple(_scale(e, info["scale_dtype"][path]) for e in own),
        magnitude=node.get("magnitude"),
        layout=Layout.from_json(info["layouts"][path]),
        dropout=float(entry.get("dropout", 0.0)),
        info=StackInfo(tuple(int(e["rank"]) for e in own)),
        residual_of=tuple(None if m is None else ResidualMark.from_json(m)
                          for m in marks))
  stacked = checkpoint_folder.nest(flat)
  if not return_configs:
    return stacked
  configs = []
  for k, a in enumerate(per):
    try:
      configs.append(None if a["config"] is None
                     else LoraConfig.from_json(a["config"], **overrides))
    except (TypeError, ValueError) as e:
      raise CheckpointError(
          f"lora_jax.load_stack: the config of adapter {k} in {folder} "
          f"cannot be read back: {e} load_stack takes such fields too: "
          f"lora_jax.load_stack(path, return_configs=True, "
          f"targets=<the function>).") from None
  return stacked, configs

