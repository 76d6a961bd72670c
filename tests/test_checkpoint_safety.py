"""Checkpoints never lose a user's files and survive a save killed anywhere."""

import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

sys.path.insert(0, os.path.dirname(__file__))
import checkpoint_child as child  # pylint: disable=wrong-import-position

CHILD = os.path.join(os.path.dirname(__file__), "checkpoint_child.py")
OLD, NEW = child.adapter("old"), child.adapter("new")


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


def _run_child(path: str, what: str, timeout: float = 240):
  return subprocess.run([sys.executable, CHILD, path, what],
                        capture_output=True, text=True, timeout=timeout)


def test_kill_at_every_file_operation(tmp_path):
  template = lj.save(tmp_path / "template", OLD)
  dry = str(tmp_path / "dry")
  shutil.copytree(template, dry)
  out = _run_child(dry, "0")
  assert out.returncode == 0, out.stderr[-2000:]
  n_ops = int(out.stdout.split()[-1])
  # mkdir staging, orbax's files, the metadata, two renames, the old removal
  assert n_ops >= 20, out.stdout
  assert _which(lj.load(dry)) == "new"

  def kill_at(k):
    path = str(tmp_path / f"k{k}")
    shutil.copytree(template, path)
    return k, path, _run_child(path, str(k))

  # Every step of the protocol and of orbax's writing (through the second
  # rename and the first removal that follows), then a sample of the removal
  # of the old folder (identical steps), and the last operation.
  ops = [line.split()[2] for line in out.stdout.splitlines()
         if line.startswith("op ")]
  last_rename = max(i for i, op in enumerate(ops, 1) if op == "rename")
  points = sorted(set(range(1, last_rename + 2))
                  | set(range(last_rename + 2, n_ops, 4)) | {n_ops})
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = list(pool.map(kill_at, points))
  outcomes = []
  for k, path, run in runs:
    assert run.returncode == -signal.SIGKILL, (k, run.stdout, run.stderr[-2000:])
    outcomes.append(_which(lj.load(path)))  # never an error, never a mix
    # The next save finishes or clears what the killed one left.
    lj.save(path, OLD, overwrite=True)
    assert _which(lj.load(path)) == "old"
    assert not os.path.exists(path + ".lora_jax-staging")
    assert not os.path.exists(path + ".lora_jax-old")
  # Killed before its first rename a save leaves the old adapter; after its
  # second rename, the new one; in between, load reads the complete staging.
  assert outcomes[0] == "old" and outcomes[-1] == "new"
  assert outcomes == sorted(outcomes, key=["old", "new"].index)


def test_kill_at_random_moments(tmp_path):
  path = str(tmp_path / "adapter")
  rng = random.Random(0)
  seen = []
  for _ in range(6):
    proc = subprocess.Popen([sys.executable, CHILD, path, "loop"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen.append(_which(lj.load(path)))
  assert set(seen) <= {"old", "new"} and len(seen) == 6


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
