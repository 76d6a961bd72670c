"""Child process of the real-kill test in test_checkpoint_safety.py, and the
file-operation watch that test shares with it.

``python checkpoint_child.py PATH K``: saves adapter "new" over the checkpoint
at PATH (overwrite=True), printing ``op N NAME TARGET`` for each file-system
mutation (see :func:`watch`) anywhere in the process (orbax's threads
included), and killing itself with SIGKILL just before the K-th (after
printing ``kill K NAME TARGET``). K = 0 kills nothing (the dry run); a save
that finishes prints ``done N``.
"""

import builtins
import io
import os
import signal
import sys
import threading

import jax

import lora_jax as lj

PATHS = ("l1/kernel", "l2/kernel", "l3/kernel")


def adapter(name: str):
  """A deterministic 3-adapter delta: "old" and "new" differ in every array."""
  seed = {"old": 0, "new": 1}[name]
  keys = jax.random.split(jax.random.key(seed), 6)
  shapes = ((8, 6), (6, 5), (5, 4))
  out = {}
  for i, (p, (k, n)) in enumerate(zip(PATHS, shapes)):
    a = jax.random.normal(keys[2 * i], (k, 2))
    b = jax.random.normal(keys[2 * i + 1], (2, n))
    out[p.split("/")[0]] = {"kernel": lj.LoraDelta(a, b, scale=float(seed + 1))}
  return out


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def watch(before_op):
  """``(module, name, wrapper)`` for every function that mutates the file
  system: os.rename, replace, unlink, remove, rmdir, mkdir, makedirs, os.open
  with a flag that writes or creates, and open (builtins and io) in a mode
  that writes. Each wrapper calls ``before_op(name, target)`` before the
  call it wraps (which does not run if ``before_op`` raises). Install them
  with setattr (the child) or monkeypatch.setattr (the in-process tests)."""
  def wrap(name, fn, mutates):
    def wrapped(*args, **kwargs):
      if mutates(*args, **kwargs):
        before_op(name, str(args[0]) if args else "")
      return fn(*args, **kwargs)
    return wrapped
  def always(*args, **kwargs):
    return True
  def writes(file, mode="r", *args, **kwargs):
    return any(c in mode for c in "wax+")
  def creates(path, flags, *args, **kwargs):
    return bool(flags & _WRITE_FLAGS)
  out = [(os, name, wrap(name, getattr(os, name), always)) for name in (
      "rename", "replace", "unlink", "remove", "rmdir", "mkdir", "makedirs")]
  out.append((os, "open", wrap("os.open", os.open, creates)))
  # builtins.open is io.open: pathlib calls the latter, most code the former.
  out += [(m, "open", wrap("open", m.open, writes)) for m in (builtins, io)]
  return out


def main():
  path, kill_at = sys.argv[1], int(sys.argv[2])
  new = adapter("new")
  jax.block_until_ready(new)
  count = 0
  lock = threading.Lock()

  def before_op(name, target):
    nonlocal count
    with lock:
      count += 1
      print(f"{'kill' if count == kill_at else 'op'} {count} {name} {target}",
            flush=True)
      if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

  for module, name, wrapper in watch(before_op):
    setattr(module, name, wrapper)
  lj.save(path, new, overwrite=True)
  print(f"done {count}", flush=True)


if __name__ == "__main__":
  main()
