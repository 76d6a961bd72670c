"""Checkpoints never lose a user's files and survive a save killed anywhere."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import checkpoint_folder

sys.path.insert(0, os.path.dirname(__file__))
import checkpoint_child as child

CHILD = os.path.join(os.path.dirname(__file__), "checkpoint_child.py")
OLD, NEW = child.adapter("old"), child.adapter("new")


def _staging(path: str) -> str:
  return checkpoint_folder.sibling(path, checkpoint_folder.STAGING)


def _bytes(delta) -> dict:
  return {p: (np.asarray(d.a).tobytes(), np.asarray(d.b).tobytes(), d.scale)
          for p, d in lj.adapters(delta).items()}


def _which(delta) -> str:
  """"old" or "new" if ``delta`` is bitwise one of them, whole; else fail."""
  got = _bytes(delta)
  for name, want in (("old", OLD), ("new", NEW)):
    if got == _bytes(want):
      return name
  raise AssertionError(f"loaded a mix or a corrupt adapter: {sorted(got)}")


class _Crash(BaseException):
  """A simulated kill: a BaseException, so that no ``except Exception`` (in
  lora_jax or orbax) takes it for an error to handle."""


class _Ops:
  """Watches this process's file-system mutations (checkpoint_child.watch,
  which the real-kill child uses too) and simulates a kill just before the
  ``crash_at``-th: it and every later one, in any thread, raise _Crash, so
  nothing more reaches the disk (cleanups of the interrupted save included).
  Threads the killed save leaves behind (orbax's, waiting for a signal its
  failed writer never sends) stay dead: any mutation of theirs raises too."""

  def __init__(self, monkeypatch):
    self._lock = threading.Lock()
    self._dead: set[threading.Thread] = set()
    self.arm(None)
    for module, name, wrapper in child.watch(self._before_op):
      monkeypatch.setattr(module, name, wrapper)

  def arm(self, crash_at: int | None) -> None:
    with self._lock:
      self.crash_at, self.seen = crash_at, []

  def bury(self, threads) -> None:
    with self._lock:
      self._dead.update(threads)

  def _before_op(self, name: str, target: str) -> None:
    with self._lock:
      if threading.current_thread() in self._dead:
        raise _Crash(f"a thread of a killed save: {name} {target}")
      self.seen.append((name, target))
      if self.crash_at is not None and len(self.seen) >= self.crash_at:
        raise _Crash(f"op {len(self.seen)}: {name} {target}")


def _settle(folder: str, quiet: float = 0.1, timeout: float = 10.0) -> None:
  """Waits until nothing under ``folder`` changes for ``quiet`` seconds: the
  killed save's array writes (tensorstore's, in C++ threads the simulation
  cannot stop) finish, as if the kill had come after them. Else they would
  race the next save's clean-up, which a real kill rules out."""
  def state():
    return sorted((os.path.join(d, f), os.stat(os.path.join(d, f)).st_size)
                  for d, _, files in os.walk(folder) for f in files)
  deadline = time.monotonic() + timeout
  last, since = None, time.monotonic()
  while time.monotonic() < deadline:
    try:
      now = state()
    except FileNotFoundError:  # a file renamed while listed
      now = None
    if now is not None and now == last:
      if time.monotonic() - since >= quiet:
        return
    else:
      last, since = now, time.monotonic()
    time.sleep(0.01)
  raise AssertionError(f"{folder} still changing {timeout} s after the kill")


def _save_new(ops: _Ops, path: str, crash_at: int | None = None,
              timeout: float = 60.0) -> tuple[bool, list]:
  """Runs ``lj.save(path, NEW, overwrite=True)`` with a kill simulated before
  file operation ``crash_at`` (None: none). Returns whether the save was
  killed, and the operations that ran. Fails, rather than hangs, if the save
  does not end within ``timeout``."""
  before = set(threading.enumerate())
  ended = []

  def run():
    try:
      lj.save(path, NEW, overwrite=True)
      ended.append(False)
    except _Crash:
      ended.append(True)

  ops.arm(crash_at)
  saver = threading.Thread(target=run, name="saver", daemon=True)
  saver.start()
  saver.join(timeout)
  assert not saver.is_alive(), (
      f"the save hung after a kill simulated at op {crash_at}: {ops.seen[-5:]}")
  # Orbax joins its threads before a save returns, but after a failure it
  # leaves some daemons waiting (its coordination timeout, 300 s) for a
  # signal the failed writer never sends: those are fenced off the disk
  # (bury). Any other thread must end (else the interpreter's exit waits).
  started = set(threading.enumerate()) - before
  deadline = time.monotonic() + (timeout if crash_at is None else 0.25)
  for thread in sorted(started, key=lambda t: t.daemon):
    wait = timeout if not thread.daemon else deadline - time.monotonic()
    threading.Thread.join(thread, max(0.0, wait))  # not orbax's join
  left = {t for t in started if t.is_alive()}
  assert crash_at is not None or not left, left
  assert all(t.daemon for t in left), (crash_at, left)
  ops.bury(left)
  seen = ops.seen
  ops.arm(None)
  if ended and ended[0]:
    _settle(os.path.dirname(path))
  # The save ended by the simulated kill (another exception failed the
  # thread), or finished having met fewer operations than ``crash_at``.
  assert ended and ended[0] == (crash_at is not None and len(seen) >= crash_at), (
      crash_at, ended, seen[-5:])
  return ended[0], seen if crash_at is None else seen[:crash_at - 1]


# Orbax's executor threads, failed by the simulated kill, may report to an
# event loop that has closed meanwhile.
@pytest.mark.filterwarnings("ignore:(?s)Exception ignored.*Event loop is closed"
                            ":pytest.PytestUnraisableExceptionWarning")
def test_save_interrupted_at_every_file_operation(tmp_path, monkeypatch):
  template = lj.save(tmp_path / "template", OLD)
  ops = _Ops(monkeypatch)

  def fresh(name: str) -> str:
    path = str(tmp_path / name / "adapter")
    shutil.copytree(template, path)
    return path

  dry = fresh("dry")
  killed, dry_ops = _save_new(ops, dry)
  assert not killed and _which(lj.load(dry)) == "new"
  # lock, staging folder, orbax's files, the metadata, two renames, the old
  # folder's removal, the lock's removal
  assert len(dry_ops) >= 20, dry_ops
  assert dry_ops.index(("rename", dry)) < dry_ops.index(
      ("rename", _staging(dry))), dry_ops

  outcomes, between = [], 0
  for k in range(1, len(dry_ops) + 1):
    path = fresh(f"k{k}")
    killed, done = _save_new(ops, path, k)
    swapped = ("rename", path) in done
    between += not os.path.exists(path)
    # Never an error, never a mix: the old adapter until the first rename
    # moves it aside, the new one from then on (read from the staging folder
    # until the second rename puts it in place).
    got = _which(lj.load(path))
    assert got == ("new" if swapped or not killed else "old"), (k, done[-3:])
    outcomes.append(got)
    # The next save finishes or clears what the killed one left.
    lj.save(path, OLD, overwrite=True)
    assert _which(lj.load(path)) == "old"
    # ... leaving no staging or old folder, and no lock file.
    assert os.listdir(os.path.dirname(path)) == ["adapter"], k
  assert outcomes[0] == "old" and outcomes[-1] == "new"
  assert outcomes == sorted(outcomes, key=["old", "new"].index)
  assert between == 1  # killed between the two renames: nothing at path


def _tree(parent: str, path: str) -> dict:
  """The folders (and files) beside and at ``path``: name (with ``path``
  written <path>) -> sorted top-level entries (None for a file)."""
  out = {}
  for name in os.listdir(parent):
    full = os.path.join(parent, name)
    key = full.replace(path, "<path>")
    out[key] = sorted(os.listdir(full)) if os.path.isdir(full) else None
  return out


def test_real_kill_matches_the_simulation(tmp_path, monkeypatch):
  """One real SIGKILL, between the two renames (load must read the staging
  folder): the child meets the same file operations as the in-process
  simulation, and leaves the same folders, which load and save handle."""
  template = lj.save(tmp_path / "template", OLD)
  ops = _Ops(monkeypatch)
  sim = str(tmp_path / "sim" / "adapter")
  shutil.copytree(template, sim)
  _, dry_ops = _save_new(ops, sim)
  k = dry_ops.index(("rename", _staging(sim))) + 1  # the second rename
  shutil.rmtree(os.path.dirname(sim))
  shutil.copytree(template, sim)
  killed, done = _save_new(ops, sim, k)
  assert killed

  real = str(tmp_path / "real" / "adapter")
  shutil.copytree(template, real)
  run = subprocess.run([sys.executable, CHILD, real, str(k)],
                       capture_output=True, text=True, timeout=240)
  assert run.returncode == -signal.SIGKILL, (run.stdout, run.stderr[-2000:])
  *lines, last = run.stdout.splitlines()
  assert last == f"kill {k} rename {_staging(real)}", run.stdout
  real_ops = [tuple(line.split(" ", 3)[2:]) for line in lines]
  # What orbax does inside arrays/ (its temporary names, their order) is its
  # own layout, which changes across releases: compare lora_jax's operations.
  arrays = os.sep + checkpoint_folder.ARRAYS_DIR
  ours = lambda ops: sorted((n, t) for n, t in ops if arrays not in t)
  mine = ours(real_ops)
  assert mine and mine == ours((n, t.replace(sim, real)) for n, t in done)

  left = _tree(os.path.dirname(real), real)
  assert left == _tree(os.path.dirname(sim), sim)
  suffixes = (checkpoint_folder.LOCK, checkpoint_folder.OLD,
              checkpoint_folder.STAGING)
  assert sorted(left) == ["<path>" + s for s in suffixes]
  assert _which(lj.load(real)) == _which(lj.load(sim)) == "new"
  lj.save(real, OLD, overwrite=True)
  assert _which(lj.load(real)) == "old"
  assert os.listdir(os.path.dirname(real)) == ["adapter"]


def test_overwrite_replaces_only_a_checkpoint(tmp_path):
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "thesis.txt").write_text("four years")
  with pytest.raises(FileExistsError, match=r"is not a lora_jax checkpoint "
                     r"\(it holds \['thesis.txt'\]\); overwrite=True replaces "
                     r"only a lora_jax checkpoint"):
    lj.save(folder, NEW, overwrite=True)
  assert os.listdir(folder) == ["thesis.txt"]
  assert (folder / "thesis.txt").read_text() == "four years"
  assert sorted(os.listdir(tmp_path)) == ["mine"]  # no staging left

  # A checkpoint with a user's file added is not replaced either.
  path = lj.save(tmp_path / "ckpt", OLD)
  with open(os.path.join(path, "notes.txt"), "w") as f:
    f.write("keep")
  with pytest.raises(FileExistsError, match="is not a lora_jax checkpoint"):
    lj.save(path, NEW, overwrite=True)
  assert _which(lj.load(path)) == "old"
  assert open(os.path.join(path, "notes.txt")).read() == "keep"

  regular = tmp_path / "file"
  regular.write_bytes(b"\x00data")
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match="exists and is not a folder; "
                       "lora_jax never replaces it"):
      lj.save(regular, NEW, overwrite=overwrite)
  assert regular.read_bytes() == b"\x00data"
  assert not os.path.exists(str(regular) + ".lora_jax-old")

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileExistsError, match="already exists; pass overwrite"):
    lj.save(empty, NEW)
  lj.save(empty, NEW, overwrite=True)  # an empty folder holds nothing to lose
  assert _which(lj.load(empty)) == "new"


def _leftovers(tmp_path, staging: str | None, old: str | None):
  """The folders a save killed between its renames leaves: "complete" or
  "partial" (no metadata) staging (new) and old checkpoints, nothing at path."""
  path = str(tmp_path / "adapter")
  for suffix, state, delta in ((".lora_jax-staging", staging, NEW),
                               (".lora_jax-old", old, OLD)):
    if state is None:
      continue
    lj.save(path + "-tmp", delta)
    os.rename(path + "-tmp", path + suffix)
    if state == "partial":
      os.remove(os.path.join(path + suffix, "lora_jax.json"))
  return path


@pytest.mark.parametrize("staging, old, want", [
    ("complete", "complete", "new"),   # killed between the two renames
    ("partial", "complete", "old"),
    (None, "complete", "old"),
    ("complete", None, "new"),
])
def test_load_and_save_recover_leftovers(tmp_path, staging, old, want):
  path = _leftovers(tmp_path, staging, old)
  assert _which(lj.load(path)) == want
  assert lj.load_metadata(path)["adapters"].keys() == lj.adapters(OLD).keys()
  with pytest.raises(FileExistsError, match="already exists"):
    lj.save(path, OLD)  # the next save first puts the complete one in place
  assert _which(lj.load(path)) == want
  assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_load_names_incomplete_leftovers(tmp_path):
  path = _leftovers(tmp_path, "partial", "partial")
  with pytest.raises(FileNotFoundError, match=(
      rf"no checkpoint at {path}\. Incomplete folders of an interrupted save "
      rf"are next to it: {path}.lora_jax-staging, {path}.lora_jax-old")):
    lj.load(path)


def _corrupt(path, edit):
  meta_file = os.path.join(path, "lora_jax.json")
  meta = json.load(open(meta_file))
  edit(meta)
  json.dump(meta, open(meta_file, "w"))


def _set(*keys_value):
  *keys, value = keys_value
  def edit(meta):
    node = meta
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = value
  return edit


@pytest.mark.parametrize("edit, match", [
    (_set("adapters", None), r"'adapters' must be a non-empty object, got None"),
    (_set("adapters", "l1/kernel", "scale", None),
     r"adapters\['l1/kernel'\].scale must be a number, got None"),
    (_set("adapters", "l1/kernel", "layout", None),
     r"adapters\['l1/kernel'\]: not a layout: None"),
    (_set("adapters", "l1/kernel", "a", "shape", None),
     r"adapters\['l1/kernel'\].a must be \{'shape': \[ints\]"),
    (_set("adapters", "l1/kernel", "b", "dtype", "complex-ish"),
     r"adapters\['l1/kernel'\].b must be"),
    (_set("adapters", "l1/kernel", None), r"adapters\['l1/kernel'\] must be an object"),
    (_set("extras", {"head/bias": 3.0}), r"extras\['head/bias'\] must be"),
    (_set("extras", [1]), r"'extras' must be an object"),
    (_set("config", 5), r"'config' must be an object or null, got 5"),
    (_set("format_version", None), r"format version None"),
    (_set("adapters", "l1/kernel", "residual_of", {"init": 1}),
     r"not a residual mark"),
])
def test_bad_metadata_is_a_checkpoint_error(tmp_path, edit, match):
  path = lj.save(tmp_path / "adapter", OLD)
  _corrupt(path, edit)
  for read in (lj.load, lj.load_metadata, lj.load_extras):
    with pytest.raises(lj.CheckpointError, match=match):
      read(path)


def test_extras_must_be_arrays(tmp_path):
  with pytest.raises(TypeError, match=r"extras\['head/bias'\] is 0.5, not an array"):
    lj.save(tmp_path / "a", OLD, extras={"head/bias": 0.5})
  assert os.listdir(tmp_path) == []


def test_tilde_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  path = lj.save("~/adapters/x", OLD)
  assert path == str(tmp_path / "adapters" / "x")
  assert sorted(os.listdir(tmp_path)) == ["adapters"]  # no folder named "~"
  assert _which(lj.load("~/adapters/x")) == "old"
  assert lj.load_metadata("~/adapters/x")["format"] == "lora_jax.adapter"


def test_config_round_trips_through_a_checkpoint(tmp_path):
  params = {"q": {"kernel": jnp.ones((6, 4))}, "v": {"kernel": jnp.ones((6, 4))}}
  cfg = lj.LoraConfig(rank=2, alpha=np.float32(3.0), targets=["q/kernel", "v/kernel"],
                      rank_pattern={"v/.*": 1}, alpha_pattern={"q/.*": 5.0},
                      dropout=np.float32(0.1), layouts={"q/kernel": lj.Layout.dense()},
                      dtype=jnp.bfloat16, init="gaussian")
  _, delta = lj.split(params, cfg, jax.random.key(0))
  path = lj.save(tmp_path / "a", delta, cfg)
  assert lj.load_config(path) == cfg
  assert lj.load_config(path).rank_for("v/kernel") == 1
  assert lj.load_config(lj.save(tmp_path / "b", delta)) is None

  fn_cfg = lj.LoraConfig(rank=2, targets=lambda p, x: p == "q/kernel")
  _, delta = lj.split(params, fn_cfg, jax.random.key(0))
  path = lj.save(tmp_path / "c", delta, fn_cfg)
  with pytest.raises(lj.CheckpointError, match=(
      r"targets was a callable \(test_config_round_trips_through_a_checkpoint"
      r".<locals>.<lambda>\), which JSON cannot hold; pass it again")):
    lj.load_config(path)
  again = lj.load_config(path, targets=fn_cfg.targets)
  assert again == fn_cfg
