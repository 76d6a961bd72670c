"""Child process of the kill tests in test_checkpoint_safety.py.

``python checkpoint_child.py PATH K``: saves adapter "new" over the checkpoint
at PATH (overwrite=True), killing itself with SIGKILL just before its K-th
file-system mutation (rename, replace, unlink, rmdir, mkdir, opening a file for
writing), anywhere in the process (orbax's writes included). K = 0 kills
nothing and prints one line per mutation (the dry run that counts them).

``python checkpoint_child.py PATH loop``: saves "old" and "new" in turn over
PATH forever, printing "ready" once the first save is done.
"""

import builtins
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


_count = 0
_lock = threading.Lock()


def _arm(kill_at: int) -> None:
  """Wraps every file-system mutation: count it, and SIGKILL before the
  ``kill_at``-th (print it when ``kill_at`` is 0)."""
  def wrap(name, fn, mutates=lambda *a, **k: True):
    def wrapped(*args, **kwargs):
      global _count
      if mutates(*args, **kwargs):
        with _lock:
          _count += 1
          n = _count
        if kill_at == 0:
          print(f"op {n} {name} {args[0] if args else ''}", flush=True)
        elif n == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
      return fn(*args, **kwargs)
    return wrapped
  for name in ("rename", "replace", "unlink", "remove", "rmdir", "mkdir"):
    setattr(os, name, wrap(name, getattr(os, name)))
  writing = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")
  builtins.open = wrap("open", builtins.open, writing)


def main():
  path, what = sys.argv[1], sys.argv[2]
  if what == "loop":
    lj.save(path, adapter("old"), overwrite=True)
    print("ready", flush=True)
    while True:
      for name in ("new", "old"):
        lj.save(path, adapter(name), overwrite=True)
  new = adapter("new")
  jax.block_until_ready(new)
  _arm(int(what))
  lj.save(path, new, overwrite=True)
  print(f"done {_count}", flush=True)


if __name__ == "__main__":
  main()
