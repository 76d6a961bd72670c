"""Adapter-only checkpoints: the LoRA factors plus a JSON of metadata.

Layout on disk::

    directory/
      lora_jax.json   # format, library version, config, and per adapter: path,
                      # layout, scale, rank, kernel shape, factor shapes/dtypes
      arrays/         # an orbax-checkpoint PyTree of {path...: {"a", "b"}}

The JSON alone describes the adapter, so :func:`load` needs neither the base
model nor the config (:func:`load_config` reads the config back). To
checkpoint a training loop (delta *and* optimiser state, every N steps, keep
the last K), use orbax's ``CheckpointManager`` directly; see
:func:`checkpoint_manager` and the README.

Why not orbax's own overwrite: ``Checkpointer.save(path, force=True)`` (0.11
to 0.12) deletes ``path`` before writing the new checkpoint, so a process
killed in between loses both, and it deletes whatever else the folder held.
A ``CheckpointManager`` keeps numbered step folders, a different layout. So
``save`` writes the complete new checkpoint next to the old one with orbax,
marks it complete by writing ``lora_jax.json`` last, and swaps the folders by
two renames; :func:`load` reads whichever complete checkpoint a killed save
left (see :func:`save`). The folder protocol is
``checkpoint_folder.py``'s.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src.checkpoint_folder import ARRAYS_DIR
from lora_jax._src.checkpoint_folder import FORMAT
from lora_jax._src.checkpoint_folder import META_FILE
from lora_jax._src.checkpoint_folder import abspath
from lora_jax._src.checkpoint_folder import lookup
from lora_jax._src.checkpoint_folder import nest
from lora_jax._src.checkpoint_folder import read_meta_file
from lora_jax._src.checkpoint_folder import readable
from lora_jax._src.checkpoint_folder import write
from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import ResidualMark
from lora_jax._src.delta import adapters
from lora_jax._src.layouts import Layout
from lora_jax._src.tokens import TrainableTokens
from lora_jax._src.tokens import check_indices
from lora_jax._src.tokens import token_deltas

# The newest format this lora_jax reads. A checkpoint with trainable tokens
# is written as version 2 (older readers refuse it rather than drop them);
# one without, as version 1.
FORMAT_VERSION = 2


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete, corrupt or does not match.

  A ``ValueError``; the message names the file and the field or fault.

  >>> import lora_jax as lj, tempfile
  >>> try:
  ...   lj.load(tempfile.mkdtemp())  # an empty folder
  ... except lj.CheckpointError as e:
  ...   print("lora_jax.json" in str(e))
  True
  """


def _version() -> str:
  from lora_jax import __version__
  return __version__


def factors(d: LoraDelta) -> dict:
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


def array_info(x: Any) -> dict:
  return {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name}


def metadata(delta: Any, config: LoraConfig | None = None) -> dict:
  """The JSON-able description of a delta that :func:`save` writes."""
  entries = {}
  for path, d in adapters(delta).items():
    entries[path] = {
        "rank": int(d.rank), "scale": float(d.scale),
        "layout": d.layout.to_json(),
        "kernel_shape": list(d.kernel_shape),
        "a": array_info(d.a), "b": array_info(d.b),
        "dropout": float(d.dropout),
    }
    if d.magnitude is not None:
      entries[path]["magnitude"] = array_info(d.magnitude)
    if d.residual_of is not None:
      entries[path]["residual_of"] = d.residual_of.to_json()
  tokens = token_deltas(delta)
  meta = {"format": FORMAT, "format_version": 2 if tokens else 1,
          "library_version": _version(),
          "config": None if config is None else config.to_json(),
          "adapters": entries}
  if tokens:
    meta["tokens"] = {p: {"indices": list(t.indices), "vocab": t.vocab,
                          "values": array_info(t.values)}
                      for p, t in tokens.items()}
  return meta


def check_extra(path: Any, x: Any, who: str = "lora_jax.save") -> None:
  """Raises, before anything is written, unless extra ``x`` is an array that
  :func:`load_extras` gives back whole (``stack_io.save_stack`` shares it)."""
  from lora_jax._src.quant import QArray
  if isinstance(x, QArray):
    raise TypeError(
        f"{who}: extras[{path!r}] is a quantized kernel ({x!r}); "
        f"extras are trained float leaves (biases, norms, a head), and a "
        f"QArray is a frozen base kernel. Nothing was written. Leave it out "
        f"of extras (re-create the quantized base with lora_jax.quantize), "
        f"save lora_jax.dequantize(x) instead, or save the quantized base "
        f"with orbax (a QArray is a pytree of arrays).")
  if not isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(
      x, jax.core.Tracer):
    raise TypeError(f"{who}: extras[{path!r}] is {x!r}, not an array; "
                    f"extras maps leaf paths to arrays.")


def save(directory: str | os.PathLike, delta: Any,
         config: LoraConfig | None = None, *, extras: dict | None = None,
         overwrite: bool = False) -> str:
  """Saves the adapters of ``delta`` (not the base) to ``directory``.

  ``extras`` (``{path: array}``, e.g. from :func:`lora_jax.trainable_leaves`)
  are base leaves trained beside the adapters (biases, norms, a head); they are
  saved too and restored by :func:`load_extras`. Each must be a concrete
  array: anything else, a :class:`lora_jax.QArray` included, is a
  ``TypeError`` raised before anything is written.

  Refuses to replace an existing folder unless ``overwrite=True``, and even
  then replaces only a lora_jax checkpoint (or an empty folder): a folder with
  other files, or a file, is an error that leaves it untouched. The new
  checkpoint is written beside the old one and swapped in when complete: a
  save killed at any moment leaves :func:`load` the old adapter or the new
  one, complete. Saves to one folder from several processes at once run one
  after the other (a lock file beside the folder, held while a save runs):
  the last one wins, whole. The folder's name may be as long as the
  filesystem allows (``NAME_MAX``, 255 bytes on most); a longer one is an
  ``OSError`` (``ENAMETOOLONG``) before anything is written.

  Args:
    directory: the checkpoint folder (``~`` is expanded).
    delta: a delta tree (from :func:`lora_jax.split` or :func:`load`).
    config: the config, recorded for :func:`load_config`.
    extras: ``{path: array}`` of trained base leaves.
    overwrite: replace an existing lora_jax checkpoint.

  Returns:
    The absolute path written.

  Raises:
    FileExistsError: ``directory`` exists and ``overwrite`` is False, or it
      is not a lora_jax checkpoint (nothing is changed).
    OSError: ``ENAMETOOLONG``, a folder name the filesystem cannot hold.
    TypeError: an extra that is not a concrete array (a ``QArray``
      included), before anything is written.
    ValueError: a delta holding no adapter, or a stack (use
      :func:`lora_jax.save_stack`).

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> cfg = lj.LoraConfig(rank=2)
  >>> base, delta = lj.split({"w": {"kernel": jnp.ones((4, 4))}}, cfg,
  ...                        jax.random.key(0))
  >>> path = lj.save(os.path.join(tempfile.mkdtemp(), "adapter"), delta, cfg)
  >>> restored = lj.load(path)
  >>> bool((restored["w"]["kernel"].a == delta["w"]["kernel"].a).all())
  True
  """
  directory = abspath(directory)
  from lora_jax._src.stack import refuse_stacks
  refuse_stacks(delta, "lora_jax.save", "Save the stack with "
                "lora_jax.save_stack, or one adapter of it with "
                "lora_jax.save(directory, lora_jax.select(stacked, k)).")
  deltas = adapters(delta)
  tokens = token_deltas(delta)
  if not deltas and not tokens:
    raise ValueError("lora_jax.save: the delta holds no LoraDelta (or "
                     "TrainableTokens) to save.")
  meta = metadata(delta, config)
  extras = dict(extras or {})
  for p, x in extras.items():
    check_extra(p, x)
  meta["extras"] = {p: array_info(x) for p, x in extras.items()}
  arrays = {}
  if deltas:
    arrays["adapters"] = nest({p: factors(d) for p, d in deltas.items()})
  if tokens:
    arrays["tokens"] = nest({p: {"values": t.values} for p, t in
                             tokens.items()})
  if extras:
    arrays["extras"] = nest(extras)
  return write(directory, meta, arrays, overwrite)


# --- reading --------------------------------------------------------------------


def _fail(directory: str, what: str) -> CheckpointError:
  return CheckpointError(f"lora_jax.load: {os.path.join(directory, META_FILE)} "
                         f"is corrupt: {what}.")


def _missing(folder: str, name: str, why: str) -> CheckpointError:
  return CheckpointError(f"lora_jax.load: {folder} has no {name}: {why}.")


def _check_array_info(directory: str, where: str, info: Any) -> None:
  ok = isinstance(info, dict) and isinstance(info.get("shape"), list) and all(
      isinstance(n, int) and not isinstance(n, bool) and n >= 0
      for n in info["shape"]) and isinstance(info.get("dtype"), str)
  if ok:
    try:
      np.dtype(info["dtype"])
    except TypeError:
      ok = False
  if not ok:
    raise _fail(directory, f"{where} must be {{'shape': [ints], 'dtype': "
                           f"name}}, got {info!r}")


def _check_entry(directory: str, path: str, info: Any) -> None:
  where = f"adapters[{path!r}]"
  if not isinstance(info, dict):
    raise _fail(directory, f"{where} must be an object, got {info!r}")
  scale, dropout = info.get("scale"), info.get("dropout", 0.0)
  for name, v in (("scale", scale), ("dropout", dropout)):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
      raise _fail(directory, f"{where}.{name} must be a number, got {v!r}")
  for k in ("a", "b") + (("magnitude",) if "magnitude" in info else ()):
    _check_array_info(directory, f"{where}.{k}", info.get(k))
  try:
    Layout.from_json(info.get("layout"))
    if info.get("residual_of") is not None:
      ResidualMark.from_json(info["residual_of"])
  except ValueError as e:
    raise _fail(directory, f"{where}: {e}") from None


def _check_tokens_entry(directory: str, path: str, info: Any) -> None:
  where = f"tokens[{path!r}]"
  if not isinstance(info, dict):
    raise _fail(directory, f"{where} must be an object, got {info!r}")
  ids, vocab = info.get("indices"), info.get("vocab", -1)
  ints = lambda v: isinstance(v, int) and not isinstance(v, bool)
  if not (isinstance(ids, list) and ids and all(ints(i) for i in ids)
          and ints(vocab)):
    raise _fail(directory, f"{where} needs 'indices' (a non-empty list of "
                           f"ints) and 'vocab' (an int), got {info!r}")
  _check_array_info(directory, f"{where}.values", info.get("values"))
  shape = info["values"]["shape"]
  if len(shape) != 2 or shape[0] != len(ids):
    raise _fail(directory, f"{where}.values must be (n, dim) with n = "
                           f"{len(ids)}, got {shape}")
  try:
    check_indices(where, tuple(ids), vocab)
  except ValueError as e:
    raise _fail(directory, str(e)) from None


def _check_meta(directory: str, meta: dict) -> None:
  """Raises a :class:`CheckpointError` naming the field unless ``meta`` has
  the types :func:`load` reads."""
  entries = meta.get("adapters")
  tokens = meta.get("tokens", {})
  if not isinstance(tokens, dict):
    raise _fail(directory, f"'tokens' must be an object, got {tokens!r}")
  if not isinstance(entries, dict) or not (entries or tokens):
    raise _fail(directory, f"'adapters' must be a non-empty object, got "
                           f"{entries!r}")
  for path, info in entries.items():
    _check_entry(directory, path, info)
  for path, info in tokens.items():
    _check_tokens_entry(directory, path, info)
  extras = meta.get("extras", {})
  if not isinstance(extras, dict):
    raise _fail(directory, f"'extras' must be an object, got {extras!r}")
  for path, info in extras.items():
    _check_array_info(directory, f"extras[{path!r}]", info)
  if not isinstance(meta.get("config"), (dict, type(None))):
    raise _fail(directory, f"'config' must be an object or null, got "
                           f"{meta.get('config')!r}")


def read_meta(directory: str | os.PathLike) -> tuple[str, dict]:
  """``(folder, metadata)`` of the checkpoint at ``directory`` (or of the
  complete one an interrupted save left beside it), validated."""
  folder = readable(abspath(directory))
  if not os.path.isdir(folder):
    raise CheckpointError(f"lora_jax.load: {folder} is a file, not a lora_jax "
                          f"checkpoint folder.")
  meta_path = os.path.join(folder, META_FILE)
  if not os.path.exists(meta_path):
    raise _missing(folder, META_FILE, "it is not a lora_jax adapter "
                   "checkpoint, or its save did not complete")
  try:
    meta = read_meta_file(folder)
  except (OSError, ValueError) as e:
    raise CheckpointError(
        f"lora_jax.load: {meta_path} is corrupt ({e}).") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(
        f"lora_jax.load: {meta_path} is not a lora_jax adapter description.")
  version = meta.get("format_version", 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(
        f"lora_jax.load: {folder} was written in format version {version!r} "
        f"by lora_jax {meta.get('library_version')}; this lora_jax reads up "
        f"to version {FORMAT_VERSION}. Upgrade lora_jax.")
  _check_meta(folder, meta)
  return folder, meta


def load_metadata(directory: str | os.PathLike) -> dict:
  """The metadata JSON of an adapter checkpoint, validated.

  Args:
    directory: the checkpoint folder (``~`` is expanded).

  Returns:
    The metadata dict (``"adapters"``, ``"config"``, ``"extras"``...).

  Raises:
    FileNotFoundError: no checkpoint at ``directory`` (nor a complete one
      an interrupted save left beside it).
    CheckpointError: the folder is not a lora_jax checkpoint, is incomplete
      or corrupt, or was written by a newer format; the error names the file
      and the field.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="w")
  >>> _, delta = lj.split({"w": jnp.ones((4, 4))}, cfg, jax.random.key(0))
  >>> meta = lj.load_metadata(lj.save(os.path.join(tempfile.mkdtemp(), "a"), delta))
  >>> meta["adapters"]["w"]["rank"], meta["adapters"]["w"]["scale"]
  (2, 2.0)
  """
  return read_meta(directory)[1]


def load_config(directory: str | os.PathLike, **overrides: Any
                ) -> LoraConfig | None:
  """The :class:`lora_jax.LoraConfig` saved with a checkpoint, or None if
  ``save`` was given none.

  Args:
    directory: the checkpoint folder.
    **overrides: fields to set instead of the recorded ones; needed for a
      callable ``targets`` / ``exclude`` / ``init``, which JSON cannot hold.

  Returns:
    The config, equal to the one saved.

  Raises:
    FileNotFoundError, CheckpointError: as :func:`load_metadata`.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> cfg = lj.LoraConfig(rank=2, targets="w", rank_pattern={"w": 1})
  >>> _, delta = lj.split({"w": jnp.ones((4, 4))}, cfg, jax.random.key(0))
  >>> path = lj.save(os.path.join(tempfile.mkdtemp(), "a"), delta, cfg)
  >>> lj.load_config(path) == cfg
  True
  """
  folder, meta = read_meta(directory)
  if meta.get("config") is None:
    return None
  try:
    return LoraConfig.from_json(meta["config"], **overrides)
  except (TypeError, ValueError) as e:
    raise CheckpointError(
        f"lora_jax.load_config: the config in {folder} cannot be read back: "
        f"{e}") from None


def restore(directory: str, meta: dict, shardings: dict | None = None) -> dict:
  """The arrays of a checkpoint, restored into the shapes the JSON records
  (and onto ``shardings[path].a`` etc. where given)."""
  shardings = shardings or {}
  unknown = [p for p in shardings if p not in meta["adapters"]]
  if unknown:
    raise CheckpointError(
        f"lora_jax.load: shardings given for {unknown[:3]}, which the "
        f"checkpoint in {directory} has no adapter for.")
  specs = {
      path: {k: _spec(info[k], getattr(shardings.get(path), k, None))
             for k in ("a", "b", "magnitude") if k in info}
      for path, info in meta["adapters"].items()}
  extras = {p: _spec(i) for p, i in meta.get("extras", {}).items()}
  target = {"adapters": nest(specs)} if specs else {}
  if meta.get("tokens"):
    target["tokens"] = nest({p: {"values": _spec(i["values"])}
                             for p, i in meta["tokens"].items()})
  if extras:
    target["extras"] = nest(extras)
  arrays_dir = os.path.join(directory, ARRAYS_DIR)
  if not os.path.isdir(arrays_dir):
    raise _missing(directory, ARRAYS_DIR + "/ directory",
                   "the checkpoint is incomplete")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(arrays_dir, target)
  except Exception as e:
    raise CheckpointError(
        f"lora_jax.load: cannot read the factors in {arrays_dir}: the "
        f"checkpoint is truncated, corrupt or does not match {META_FILE} "
        f"({type(e).__name__}: {str(e)[:500]}).") from e


def load(directory: str | os.PathLike, shardings: Any = None) -> dict:
  """Restores a delta saved by :func:`save`; needs no base and no config.

  Returns a nested dict mirroring the adapted leaves' paths with a
  :class:`LoraDelta` (or :class:`TrainableTokens`) at each (other leaves
  are absent, which :func:`lora_jax.merge` and :func:`lora_jax.wrap` accept
  since they match adapters to the base by path). ``shardings`` (e.g. from
  :func:`lora_jax.delta_shardings`) restores each factor straight onto its
  placement across the mesh. If a save was killed between its two renames,
  the complete checkpoint it left beside ``directory`` is read.

  Args:
    directory: the checkpoint folder (``~`` is expanded).
    shardings: a delta-like tree of factor shardings, or None.

  Returns:
    The delta tree.

  Raises:
    FileNotFoundError, CheckpointError: as :func:`load_metadata`; also a
      CheckpointError for a stack's checkpoint (use
      :func:`lora_jax.load_stack`).

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> _, delta = lj.split({"fc": {"kernel": jnp.ones((4, 4))}},
  ...                     lj.LoraConfig(rank=2), jax.random.key(0))
  >>> path = lj.save(os.path.join(tempfile.mkdtemp(), "a"), delta)
  >>> lj.load(path)
  {'fc': {'kernel': LoraDelta(rank=2, kernel=(4, 4), a=f32[4,2], b=f32[2,4], scale=8)}}
  """
  folder, meta = read_meta(directory)
  if "stack" in meta:  # written by lora_jax.save_stack
    raise CheckpointError(
        f"lora_jax.load: {folder} holds a stack of adapters; read it with "
        f"lora_jax.load_stack (and take one out with lora_jax.select).")
  arrays = restore(folder, meta, adapters(shardings)
                   if shardings is not None else None)
  flat: dict = {path: delta_from_meta(lookup(arrays["adapters"], path), info)
                for path, info in meta["adapters"].items()}
  for path, info in meta.get("tokens", {}).items():
    flat[path] = TrainableTokens(lookup(arrays["tokens"], path)["values"],
                                 tuple(info["indices"]), info["vocab"])
  return nest(flat)


def delta_from_meta(node: dict, info: dict) -> LoraDelta:
  """One adapter from its restored arrays (``a``, ``b``, maybe
  ``magnitude``) and its checked metadata entry."""
  mark = info.get("residual_of")
  return LoraDelta(
      node["a"], node["b"], scale=float(info["scale"]),
      layout=Layout.from_json(info["layout"]),
      magnitude=node.get("magnitude"),
      dropout=float(info.get("dropout", 0.0)),
      residual_of=None if mark is None else ResidualMark.from_json(mark))


def load_extras(directory: str | os.PathLike) -> dict:
  """``{path: array}`` of the base leaves saved with ``save(..., extras=)``;
  apply them with :func:`lora_jax.with_leaves`.

  Args:
    directory: the checkpoint folder (``~`` is expanded).

  Returns:
    ``{path: array}``; empty if none were saved.

  Raises:
    FileNotFoundError, CheckpointError: as :func:`load_metadata`.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, os
  >>> base = {"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.full(4, 0.5)}}
  >>> base, delta = lj.split(base, lj.LoraConfig(rank=2), jax.random.key(0))
  >>> extras = lj.trainable_leaves(base, r".*/bias")
  >>> path = lj.save(os.path.join(tempfile.mkdtemp(), "a"), delta, extras=extras)
  >>> lj.load_extras(path)["fc/bias"]
  Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
  """
  folder, meta = read_meta(directory)
  if not meta.get("extras"):
    return {}
  restored = restore(folder, meta)["extras"]
  return {p: lookup(restored, p) for p in meta["extras"]}


def checkpoint_manager(directory: str | os.PathLike, every: int = 1,
                       keep: int | None = None) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` for a training loop's state.

  Save a training state (delta and optimiser state) with
  ``mngr.save(step, args=ocp.args.StandardSave(state))`` and resume with
  ``mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(
  jax.eval_shape(lambda: state)))``; the restored state is bit-identical.

  Args:
    directory: the folder of the numbered step checkpoints (``~`` is
      expanded).
    every: save every ``every`` steps (others are skipped).
    keep: keep the last ``keep`` steps; None keeps all.

  Returns:
    An ``orbax.checkpoint.CheckpointManager``; close it when done.

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
  return ocp.CheckpointManager(abspath(directory), options=options)
