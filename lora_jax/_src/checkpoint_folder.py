"""The kill-safe folder protocol of lora_jax checkpoints.

A checkpoint is a folder holding ``lora_jax.json`` (its description) and
``arrays/`` (an orbax PyTree). :func:`write` replaces such a folder so that a
process killed at any moment leaves a complete checkpoint, old or new.
A folder is a complete checkpoint iff it holds lora_jax.json: save writes that
file last (by rename), and removing a folder deletes it first. The folder at
``path`` only ever appears by renaming a complete staging folder, and leaves
by renaming it to the old folder, so a save killed at any moment leaves a
complete checkpoint at ``path``, or (between the two renames) none there and a
complete one in the staging or old folder, which load and the next save use.

Saves to one folder are serialized by an ``flock``ed lock file beside it.
:func:`readable` is the folder a reader should open for a checkpoint path.
``checkpoint.py`` (one adapter) and ``stack_io.py`` (a stack) share this
module; what the JSON and arrays mean is theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import hashlib
import json
import os
import shutil
from typing import Any

try:
  import fcntl
except ImportError:  # Windows: saves to one folder are not serialized
  fcntl = None  # type: ignore[assignment]

import jax
import orbax.checkpoint as ocp

FORMAT = "lora_jax.adapter"  # the "format" of a complete checkpoint's JSON
META_FILE = "lora_jax.json"
ARRAYS_DIR = "arrays"
STAGING = ".lora_jax-staging"  # suffixes of the folders a save works in
OLD = ".lora_jax-old"
LOCK = ".lora_jax-lock"  # the file a save holds locked while it runs
NAME_MAX = 255  # bytes in one file name, where the filesystem does not say
_OURS = (META_FILE, META_FILE + ".tmp", ARRAYS_DIR)  # + orbax's arrays.<tmp>


def _sync(name: str) -> None:
  """A barrier across processes (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def abspath(directory: str | os.PathLike) -> str:
  return os.path.abspath(os.path.expanduser(os.fspath(directory)))


def nest(flat: dict[str, Any]) -> dict:
  """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return out


def lookup(tree: dict, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def read_meta_file(directory: str) -> Any:
  with open(os.path.join(directory, META_FILE)) as f:
    return json.load(f)


def _is_complete(directory: str) -> bool:
  try:
    meta = read_meta_file(directory)
  except (OSError, ValueError):
    return False
  return isinstance(meta, dict) and meta.get("format") == FORMAT


def _ours(directory: str) -> bool:
  """Whether ``directory`` holds nothing but (part of) a lora_jax checkpoint."""
  return os.path.isdir(directory) and not os.path.islink(directory) and all(
      name in _OURS or name.startswith(ARRAYS_DIR + ".orbax-checkpoint-tmp")
      for name in os.listdir(directory))


def _remove(directory: str) -> None:
  """Deletes a folder of ours, its completion mark first."""
  if not os.path.lexists(directory):
    return
  if not _ours(directory):
    raise FileExistsError(
        f"lora_jax.save: {directory} is in the way (lora_jax uses that name "
        f"while saving) and holds files that are not a lora_jax checkpoint: "
        f"{sorted(os.listdir(directory))[:5] if os.path.isdir(directory) else 'a file'}. "
        f"Move it away.")
  try:
    os.remove(os.path.join(directory, META_FILE))
  except FileNotFoundError:
    pass
  shutil.rmtree(directory)


def _name_max(parent: str) -> int:
  """The longest file name (bytes) the filesystem of ``parent`` allows."""
  while parent and not os.path.isdir(parent):
    parent = os.path.dirname(parent)
  try:
    return os.pathconf(parent or os.sep, "PC_NAME_MAX")
  except (AttributeError, OSError, ValueError):  # no pathconf (Windows)
    return NAME_MAX


def sibling(directory: str, suffix: str) -> str:
  """The folder (or file) beside ``directory`` that a save uses: the name
  plus ``suffix`` where that fits the filesystem's name limit, else a short
  name derived from a hash of the name (so names up to the limit work)."""
  parent, name = os.path.split(directory)
  if len(os.fsencode(name + suffix)) <= _name_max(parent):
    return directory + suffix
  digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:20]
  return os.path.join(parent, f".lora_jax-{digest}{suffix}")


def _leftovers(directory: str) -> list[str]:
  return [sibling(directory, s) for s in (STAGING, OLD)
          if os.path.lexists(sibling(directory, s))]


def readable(directory: str) -> str:
  """The folder :func:`load` reads for ``directory``: itself, or the complete
  checkpoint a save killed between its renames left (the new one first)."""
  if os.path.lexists(directory):
    return directory
  for candidate in _leftovers(directory):
    if _is_complete(candidate):
      return candidate
  left = _leftovers(directory)
  raise FileNotFoundError(
      f"lora_jax.load: no checkpoint at {directory}." + (
          f" Incomplete folders of an interrupted save are next to it: "
          f"{', '.join(left)}." if left else ""))


def _recover(directory: str) -> None:
  """Finishes what a killed save left: puts the complete new (else old)
  checkpoint at ``directory`` if nothing is there, removes the rest of ours."""
  if not os.path.lexists(directory):
    done = next((c for c in _leftovers(directory) if _is_complete(c)), None)
    if done is not None:
      os.rename(done, directory)
  for leftover in _leftovers(directory):
    if _ours(leftover):
      _remove(leftover)


def _check_destination(directory: str, overwrite: bool) -> None:
  """Raises, touching nothing, unless ``directory`` may be written."""
  if not os.path.lexists(directory):
    return
  if not os.path.isdir(directory) or os.path.islink(directory):
    raise FileExistsError(
        f"lora_jax.save: {directory} exists and is not a folder; lora_jax never "
        f"replaces it. Choose another path.")
  if not overwrite:
    raise FileExistsError(
        f"lora_jax.save: {directory} already exists; pass overwrite=True to "
        f"replace it (the old checkpoint is kept until the new one is "
        f"complete).")
  entries = os.listdir(directory)
  if entries and not (_ours(directory) and _is_complete(directory)):
    raise FileExistsError(
        f"lora_jax.save: {directory} is not a lora_jax checkpoint (it holds "
        f"{sorted(entries)[:5]}); overwrite=True replaces only a lora_jax "
        f"checkpoint. Nothing was changed: choose another path.")


def _swap(directory: str, staging: str) -> None:
  """Moves the complete ``staging`` folder to ``directory``."""
  if os.path.lexists(directory):
    old = sibling(directory, OLD)
    _remove(old)
    os.rename(directory, old)
    os.rename(staging, directory)
    _remove(old)
  else:
    os.rename(staging, directory)


def _check_name(directory: str) -> None:
  """Raises ENAMETOOLONG, touching nothing, if the filesystem cannot hold
  the folder's name."""
  parent, name = os.path.split(directory)
  limit = _name_max(parent)
  if len(os.fsencode(name)) > limit:
    raise OSError(
        errno.ENAMETOOLONG,
        f"lora_jax.save: the folder name is {len(os.fsencode(name))} bytes; "
        f"this filesystem allows at most {limit}. Choose a shorter name",
        directory)


_UNLOCKABLE = {errno.ENOLCK, errno.EINVAL, errno.EBADF, errno.ENOSYS,
               getattr(errno, "EOPNOTSUPP", errno.EINVAL),
               getattr(errno, "ENOTSUP", errno.EINVAL)}


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
  """Holds an exclusive lock on saving to ``directory`` (a file beside it,
  ``flock``ed): a second process saving there waits for the first, then
  saves in its turn. The file is removed on release (and after a killed
  save, by the next save); a filesystem without ``flock`` gets no lock."""
  if fcntl is None:
    yield
    return
  path = sibling(directory, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
      os.close(fd)
      if e.errno not in _UNLOCKABLE:
        raise
      yield  # this filesystem cannot lock: saves are not serialized
      return
    # The previous holder removes the file before unlocking it: the file
    # locked here must still be the one at `path`.
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    yield
  finally:
    try:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    finally:
      os.close(fd)


def _write_meta(staging: str, meta: dict) -> None:
  tmp = os.path.join(staging, META_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(staging, META_FILE))


def write(directory: str | os.PathLike, meta: dict, arrays: dict,
          overwrite: bool) -> str:
  """Writes ``arrays`` (orbax) and ``meta`` (``lora_jax.json``, last) to
  ``directory`` by the folder protocol (see the module docstring);
  ``lora_jax.save`` and ``lora_jax.save_stack`` share it. Returns the
  absolute path."""
  directory = abspath(directory)
  _check_name(directory)
  lead = jax.process_index() == 0
  parent = os.path.dirname(directory)
  if lead and not os.path.isdir(parent):
    os.makedirs(parent)
  # Process 0 holds the lock for the whole save: saves to one folder from
  # several programs run one after the other (the last one wins, whole).
  with _locked(directory) if lead else contextlib.nullcontext():
    if lead:
      _recover(directory)
    _sync("lora_jax.save.recovered")
    _check_destination(directory, overwrite)
    # Every process writes its shards into the same staging folder (orbax
    # coordinates them); process 0 does the file moves.
    staging = sibling(directory, STAGING)
    if lead:
      _remove(staging)
      os.makedirs(staging)
    _sync("lora_jax.save.start")
    try:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(staging, ARRAYS_DIR), arrays)
        ckptr.wait_until_finished()
      if lead:
        _write_meta(staging, meta)
        _swap(directory, staging)
    except BaseException:
      if lead and _ours(staging):
        _remove(staging)
      raise
    _sync("lora_jax.save.done")
  return directory
