"""Adapter-only checkpoints: the LoRA factors plus a JSON of metadata.

Layout on disk::

    directory/
      lora_jax.json   # format, library version, config, and per adapter: path,
                      # layout, scale, rank, kernel shape, factor shapes/dtypes
      arrays/         # an orbax-checkpoint PyTree of {path...: {"a", "b"}}

The JSON alone describes the adapter, so :func:`load` needs neither the base
model nor the config. To checkpoint a training loop (delta *and* optimiser
state, every N steps, keep the last K), use orbax's ``CheckpointManager``
directly; see :func:`checkpoint_manager` and the README.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta, adapters
from lora_jax._src.layouts import Layout

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
META_FILE = "lora_jax.json"
ARRAYS_DIR = "arrays"


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete, corrupt or does not match."""


def _sync(name: str) -> None:
  """A barrier across processes (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _version() -> str:
  from lora_jax import __version__  # pylint: disable=import-outside-toplevel
  return __version__


def _nest(flat: dict[str, Any]) -> dict:
  """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return out


def _factors(d: LoraDelta) -> dict:
  out = {"a": d.a, "b": d.b}
  if d.magnitude is not None:
    out["magnitude"] = d.magnitude
  return out


def _spec(info: dict, sharding: Any = None) -> jax.ShapeDtypeStruct:
  # Without a placement, restore onto this process's first device: this works
  # whatever topology (devices, processes) wrote the checkpoint.
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(tuple(info["shape"]), np.dtype(info["dtype"]),
                              sharding=sharding)


def _dtype_name(x) -> str:
  return np.dtype(x.dtype).name


def metadata(delta: Any, config: LoraConfig | None = None) -> dict:
  """The JSON-able description of a delta that :func:`save` writes."""
  entries = {}
  for path, d in adapters(delta).items():
    entries[path] = {
        "rank": int(d.rank), "scale": float(d.scale),
        "layout": d.layout.to_json(),
        "kernel_shape": list(d.kernel_shape),
        "a": {"shape": list(d.a.shape), "dtype": _dtype_name(d.a)},
        "b": {"shape": list(d.b.shape), "dtype": _dtype_name(d.b)},
        "dropout": float(d.dropout),
    }
    if d.magnitude is not None:
      entries[path]["magnitude"] = {"shape": list(d.magnitude.shape),
                                     "dtype": _dtype_name(d.magnitude)}
  return {"format": FORMAT, "format_version": FORMAT_VERSION,
          "library_version": _version(),
          "config": None if config is None else config.to_json(),
          "adapters": entries}


def save(directory: str | os.PathLike, delta: Any,
         config: LoraConfig | None = None, *, extras: dict | None = None,
         overwrite: bool = False) -> str:
  """Saves the adapters of ``delta`` (not the base) to ``directory``.

  ``extras`` (``{path: array}``, e.g. from :func:`lora_jax.trainable_leaves`)
  are base leaves trained beside the adapters (biases, norms, a head); they are
  saved too and restored by :func:`load_extras`.

  Refuses to replace an existing directory unless ``overwrite=True``; even
  then the old checkpoint is removed only after the new one is complete.
  Returns the absolute path written.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> cfg = lj.LoraConfig(rank=2)
  >>> base, delta = lj.split({"w": {"kernel": jnp.ones((4, 4))}}, cfg,
  ...                        jax.random.key(0))
  >>> path = lj.save(os.path.join(tempfile.mkdtemp(), "adapter"), delta, cfg)
  >>> restored = lj.load(path)
  >>> bool((restored["w"]["kernel"].a == delta["w"]["kernel"].a).all())
  True
  """
  directory = os.path.abspath(os.fspath(directory))
  deltas = adapters(delta)
  if not deltas:
    raise ValueError("lora_jax.save: the delta holds no LoraDelta to save.")
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(
        f"lora_jax.save: {directory} already exists; pass overwrite=True to "
        f"replace it (the old checkpoint is kept until the new one is "
        f"complete).")
  meta = metadata(delta, config)
  extras = dict(extras or {})
  meta["extras"] = {p: {"shape": list(x.shape), "dtype": _dtype_name(x)}
                    for p, x in extras.items()}
  arrays = {"adapters": _nest({p: _factors(d) for p, d in deltas.items()})}
  if extras:
    arrays["extras"] = _nest(extras)
  # Write next to the target, then move it into place: a crash leaves the old
  # checkpoint intact. Every process writes its shards into the same staging
  # directory (orbax coordinates them); process 0 does the file moves.
  staging = directory + ".lora_jax-staging"
  lead = jax.process_index() == 0
  if lead:
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
  _sync("lora_jax.save.start")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(staging, ARRAYS_DIR), arrays)
      ckptr.wait_until_finished()
    if lead:
      with open(os.path.join(staging, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
      if os.path.exists(directory):
        old = directory + ".lora_jax-old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old)
      else:
        os.rename(staging, directory)
  except BaseException:
    if lead:
      shutil.rmtree(staging, ignore_errors=True)
    raise
  _sync("lora_jax.save.done")
  return directory


def load_metadata(directory: str | os.PathLike) -> dict:
  """The metadata JSON of an adapter checkpoint, validated.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="w")
  >>> _, delta = lj.split({"w": jnp.ones((4, 4))}, cfg, jax.random.key(0))
  >>> meta = lj.load_metadata(lj.save(os.path.join(tempfile.mkdtemp(), "a"), delta))
  >>> meta["adapters"]["w"]["rank"], meta["adapters"]["w"]["scale"]
  (2, 2.0)
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"lora_jax.load: no checkpoint at {directory}.")
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.exists(meta_path):
    raise CheckpointError(
        f"lora_jax.load: {directory} has no {META_FILE}: it is not a lora_jax "
        f"adapter checkpoint, or its save did not complete.")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(
        f"lora_jax.load: {meta_path} is corrupt ({e}).") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(
        f"lora_jax.load: {meta_path} is not a lora_jax adapter description.")
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise CheckpointError(
        f"lora_jax.load: {directory} was written in format version "
        f"{meta['format_version']} by lora_jax {meta.get('library_version')}; "
        f"this lora_jax reads up to version {FORMAT_VERSION}. Upgrade lora_jax.")
  return meta


def _restore(directory: str, meta: dict, shardings: dict | None = None) -> dict:
  """The arrays of a checkpoint, restored into the shapes the JSON records
  (and onto ``shardings[path].a`` etc. where given)."""
  shardings = shardings or {}
  unknown = [p for p in shardings if p not in meta.get("adapters", {})]
  if unknown:
    raise CheckpointError(
        f"lora_jax.load: shardings given for {unknown[:3]}, which the "
        f"checkpoint in {directory} has no adapter for.")
  try:
    specs = {
        path: {k: _spec(info[k], getattr(shardings.get(path), k, None))
               for k in ("a", "b", "magnitude") if k in info}
        for path, info in meta["adapters"].items()}
    extras = {p: _spec(i) for p, i in meta.get("extras", {}).items()}
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(
        f"lora_jax.load: the adapter list in {META_FILE} is corrupt ({e!r}).") from None
  target = {"adapters": _nest(specs)}
  if extras:
    target["extras"] = _nest(extras)
  arrays_dir = os.path.join(directory, ARRAYS_DIR)
  if not os.path.isdir(arrays_dir):
    raise CheckpointError(
        f"lora_jax.load: {directory} has no {ARRAYS_DIR}/ directory: the "
        f"checkpoint is incomplete.")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(arrays_dir, target)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"lora_jax.load: cannot read the factors in {arrays_dir}: the "
        f"checkpoint is truncated, corrupt or does not match {META_FILE} "
        f"({type(e).__name__}: {str(e)[:500]}).") from e


def _lookup(tree: dict, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def load(directory: str | os.PathLike, shardings: Any = None) -> dict:
  """Restores a delta saved by :func:`save`; needs no base and no config.

  Returns a nested dict mirroring the adapted leaves' paths with a
  :class:`LoraDelta` at each (other leaves are absent, which
  :func:`lora_jax.merge` and :func:`lora_jax.wrap` accept since they match
  adapters to the base by path). ``shardings`` (e.g. from
  :func:`lora_jax.delta_shardings`) restores each factor straight onto its
  placement across the mesh.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> _, delta = lj.split({"fc": {"kernel": jnp.ones((4, 4))}},
  ...                     lj.LoraConfig(rank=2), jax.random.key(0))
  >>> path = lj.save(os.path.join(tempfile.mkdtemp(), "a"), delta)
  >>> lj.load(path)
  {'fc': {'kernel': LoraDelta(rank=2, kernel=(4, 4), a=f32[4,2], b=f32[2,4], scale=8)}}
  """
  directory = os.path.abspath(os.fspath(directory))
  meta = load_metadata(directory)
  restored = _restore(directory, meta, adapters(shardings)
                      if shardings is not None else None)["adapters"]
  flat = {}
  for path, info in meta["adapters"].items():
    node = _lookup(restored, path)
    flat[path] = LoraDelta(node["a"], node["b"], scale=float(info["scale"]),
                           layout=Layout.from_json(info["layout"]),
                           magnitude=node.get("magnitude"),
                           dropout=float(info.get("dropout", 0.0)))
  return _nest(flat)


def load_extras(directory: str | os.PathLike) -> dict:
  """``{path: array}`` of the base leaves saved with ``save(..., extras=)``;
  apply them with :func:`lora_jax.with_leaves`.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> base = {"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.full(4, 0.5)}}
  >>> base, delta = lj.split(base, lj.LoraConfig(rank=2), jax.random.key(0))
  >>> extras = lj.trainable_leaves(base, r".*/bias")
  >>> path = lj.save(os.path.join(tempfile.mkdtemp(), "a"), delta, extras=extras)
  >>> lj.load_extras(path)["fc/bias"]
  Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
  """
  directory = os.path.abspath(os.fspath(directory))
  meta = load_metadata(directory)
  if not meta.get("extras"):
    return {}
  restored = _restore(directory, meta)["extras"]
  return {p: _lookup(restored, p) for p in meta["extras"]}


def checkpoint_manager(directory: str | os.PathLike, every: int = 1,
                       keep: int | None = None) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` saving every ``every`` steps, keeping the
  last ``keep``. Save a training state (delta and optimiser state) with
  ``mngr.save(step, args=ocp.args.StandardSave(state))`` and resume with
  ``mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(
  jax.eval_shape(lambda: state)))``; the restored state is bit-identical.

  >>> import jax.numpy as jnp, lora_jax as lj, tempfile
  >>> import orbax.checkpoint as ocp
  >>> mngr = lj.checkpoint_manager(tempfile.mkdtemp(), every=2, keep=1)
  >>> for step in range(1, 5):
  ...   _ = mngr.save(step, args=ocp.args.StandardSave({"x": jnp.ones(2) * step}))
  >>> mngr.wait_until_finished(); mngr.all_steps()
  [4]
  >>> mngr.close()
  """
  options = ocp.CheckpointManagerOptions(save_interval_steps=every,
                                         max_to_keep=keep)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)),
                               options=options)
