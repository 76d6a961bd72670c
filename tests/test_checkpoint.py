import errno
import json
import os
import re
import subprocess
import sys
import textwrap

from cases import CASES
import chex
from helpers import randomize
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj


def _trained(name="attention"):
  case = CASES[name]
  cfg = lj.LoraConfig(rank=2, alpha=3.0, targets=case.targets)
  base, delta = lj.split(case.params, cfg, jax.random.key(1), apply_fn=case.fn,
                         example_args=case.args)
  return case, cfg, base, randomize(delta)


def test_save_load_roundtrip_bitwise(tmp_path):
  case, cfg, base, delta = _trained()
  path = lj.save(tmp_path / "adapter", delta, cfg)
  loaded = lj.load(path)
  want = lj.adapters(delta)
  got = lj.adapters(loaded)
  assert set(got) == set(want)
  for p in want:
    assert got[p].layout == want[p].layout and got[p].scale == want[p].scale
    np.testing.assert_array_equal(np.asarray(got[p].a), np.asarray(want[p].a))
    np.testing.assert_array_equal(np.asarray(got[p].b), np.asarray(want[p].b))
  # a loaded delta (no None slots) merges and wraps like the original
  chex.assert_trees_all_equal(lj.merge(base, loaded), lj.merge(base, delta))
  meta = lj.load_metadata(path)
  assert meta["config"]["rank"] == 2 and meta["config"]["alpha"] == 3.0
  assert meta["adapters"]["out/kernel"]["layout"] == {
      "batch": [], "inputs": [0, 1], "outputs": [2]}
  assert meta["library_version"] == lj.__version__


def test_load_in_a_fresh_process(tmp_path):
  case, cfg, base, delta = _trained("scan_remat")
  path = lj.save(tmp_path / "adapter", delta, cfg)
  script = textwrap.dedent(f"""
      import numpy as np, lora_jax as lj
      d = lj.adapters(lj.load({str(path)!r}))
      for p, x in sorted(d.items()):
          print(p, x.layout.batch, np.asarray(x.a).tobytes().hex(),
                np.asarray(x.b).tobytes().hex())
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True).stdout.split()
  (p, d), = lj.adapters(delta).items()
  assert out[0] == p and out[1] == "(0,)"
  assert out[2] == np.asarray(d.a).tobytes().hex()
  assert out[3] == np.asarray(d.b).tobytes().hex()


def test_nnx_delta_roundtrip(tmp_path):
  case, cfg, base, delta = _trained("nnx_linear")
  loaded = lj.load(lj.save(tmp_path / "a", delta, cfg))
  y = lj.wrap(case.fn)(base, loaded, *case.args)
  np.testing.assert_array_equal(y, lj.wrap(case.fn)(base, delta, *case.args))


def test_refuses_to_overwrite_and_overwrites_safely(tmp_path):
  case, cfg, base, delta = _trained()
  path = lj.save(tmp_path / "adapter", delta, cfg)
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    lj.save(path, randomize(delta, seed=5), cfg)
  np.testing.assert_array_equal(  # the first checkpoint is intact
      lj.load(path)["out"]["kernel"].b, delta["out"]["kernel"].b)
  other = randomize(delta, seed=5)
  lj.save(path, other, cfg, overwrite=True)
  np.testing.assert_array_equal(lj.load(path)["out"]["kernel"].b,
                                other["out"]["kernel"].b)
  assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
  case, cfg, base, delta = _trained()
  path = lj.save(tmp_path / "adapter", delta, cfg)
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs
                if os.sep + "d" + os.sep in os.path.join(r, f)]
  assert data_files
  for f in data_files:
    with open(f, "r+b") as fh:
      fh.truncate(max(0, os.path.getsize(f) // 3))
  with pytest.raises(lj.CheckpointError, match="truncated, corrupt or does not match"):
    lj.load(path)


def test_missing_and_corrupt_metadata(tmp_path):
  case, cfg, base, delta = _trained()
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    lj.load(tmp_path / "nope")
  path = lj.save(tmp_path / "adapter", delta, cfg)
  meta_file = os.path.join(path, "lora_jax.json")
  meta = json.load(open(meta_file))
  meta["adapters"]["out/kernel"]["a"]["shape"] = [9, 9, 2]
  json.dump(meta, open(meta_file, "w"))
  with pytest.raises(lj.CheckpointError, match="does not match"):
    lj.load(path)
  open(meta_file, "w").write("{not json")
  with pytest.raises(lj.CheckpointError, match="lora_jax.json is corrupt"):
    lj.load(path)
  os.remove(meta_file)
  with pytest.raises(lj.CheckpointError, match="not a lora_jax adapter checkpoint"):
    lj.load(path)


def test_loading_into_mismatched_base_names_leaf(tmp_path):
  case, cfg, base, delta = _trained("dense")
  loaded = lj.load(lj.save(tmp_path / "a", delta, cfg))
  with pytest.raises(ValueError, match=r"mismatch at 'kernel'"):
    lj.merge({"kernel": jnp.ones((8, 7)), "bias": jnp.ones(7)}, loaded)


def test_checkpoint_manager_resumes_bit_identically(tmp_path):
  case = CASES["dense"]
  base, delta = case.split(rank=2)
  apply = lj.wrap(case.fn)
  tx = optax.adam(1e-2)
  x = case.args[0]

  @jax.jit
  def step(delta, opt_state):
    g = jax.grad(lambda d: jnp.mean((apply(base, d, x) - 1.0) ** 2))(delta)
    updates, opt_state = tx.update(g, opt_state, delta)
    return optax.apply_updates(delta, updates), opt_state

  def run(state, start, stop, mngr=None):
    for i in range(start, stop):
      state = step(*state)
      if mngr is not None:
        mngr.save(i + 1, args=ocp.args.StandardSave(state))
    return state

  init = (delta, tx.init(delta))
  straight = run(init, 0, 10)

  mngr = lj.checkpoint_manager(tmp_path / "ckpt", every=3, keep=2)
  run(init, 0, 7, mngr)  # "crashes" after step 7
  mngr.wait_until_finished()
  assert mngr.all_steps() == [3, 6]  # saved every 3, kept the last 2
  abstract = jax.eval_shape(lambda: init)
  resumed = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
  mngr.close()
  resumed = run(resumed, 6, 10)
  chex.assert_trees_all_equal(resumed, straight)


def test_a_quantized_extra_is_refused_before_anything_is_written(tmp_path):
  case, cfg, base, delta = _trained("dense")
  q = lj.quantize({"w": jnp.ones((64, 8))}, "nf4", block_size=64)["w"]
  with pytest.raises(TypeError, match=re.escape(
      "lora_jax.save: extras['head/kernel'] is a quantized kernel "
      "(QArray(nf4, f32[64,8], block 64)); extras are trained float leaves")):
    lj.save(tmp_path / "a", delta, cfg, extras={"head/kernel": q})
  assert os.listdir(tmp_path) == []  # nothing written
  # over an existing checkpoint: refused, the checkpoint untouched
  path = lj.save(tmp_path / "a", delta, cfg, extras={"b": jnp.arange(3.0)})
  before = sorted(os.path.relpath(os.path.join(r, f), tmp_path)
                  for r, _, fs in os.walk(tmp_path) for f in fs)
  with pytest.raises(TypeError, match="Nothing was written"):
    lj.save(path, randomize(delta, seed=3), cfg, overwrite=True,
            extras={"b": jnp.arange(3.0), "head/kernel": q})
  assert sorted(os.path.relpath(os.path.join(r, f), tmp_path)
                for r, _, fs in os.walk(tmp_path) for f in fs) == before
  np.testing.assert_array_equal(lj.load(path)["kernel"].b, delta["kernel"].b)
  np.testing.assert_array_equal(lj.load_extras(path)["b"], [0.0, 1.0, 2.0])
  # a float (dequantized) extra is saved and comes back whole
  lj.save(path, delta, cfg, overwrite=True,
          extras={"head/kernel": lj.dequantize(q)})
  np.testing.assert_array_equal(lj.load_extras(path)["head/kernel"],
                                np.ones((64, 8), np.float32))


def test_folder_names_up_to_the_filesystem_limit(tmp_path):
  case, cfg, base, delta = _trained("dense")
  limit = os.pathconf(tmp_path, "PC_NAME_MAX")
  assert limit == 255
  longest = tmp_path / ("a" * limit)
  path = lj.save(longest, delta, cfg)
  path = lj.save(longest, randomize(delta, seed=2), cfg, overwrite=True)
  np.testing.assert_array_equal(lj.load(path)["kernel"].b,
                                randomize(delta, seed=2)["kernel"].b)
  assert os.listdir(tmp_path) == ["a" * limit]  # no staging or lock left
  with pytest.raises(OSError, match=re.escape(
      "lora_jax.save: the folder name is 256 bytes; this filesystem allows at "
      "most 255. Choose a shorter name")) as e:
    lj.save(tmp_path / ("b" * (limit + 1)), delta, cfg)
  assert e.value.errno == errno.ENAMETOOLONG
  assert os.listdir(tmp_path) == ["a" * limit]  # nothing written


_SAVER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import jax, lora_jax as lj
    from checkpoint_child import adapter
    path, go = sys.argv[1:]
    delta = adapter("new")
    jax.block_until_ready(delta)
    print("ready", flush=True)
    while not os.path.exists(go):
      time.sleep(0.002)
    for _ in range(3):
      lj.save(path, delta, overwrite=True)
    print("saved", flush=True)
""")


def test_two_processes_saving_to_one_folder(tmp_path):
  """This process and a child save "old" and "new" to one folder at once:
  both succeed and the folder holds one of the two, whole."""
  import checkpoint_child as child
  path, go = str(tmp_path / "adapter"), str(tmp_path / "go")
  script = _SAVER.format(tests=os.path.dirname(__file__))
  with subprocess.Popen([sys.executable, "-c", script, path, go],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) as proc:
    old = child.adapter("old")
    lj.save(tmp_path / "warm", old)  # compiled and imported before the race
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    open(go, "w").close()
    for _ in range(3):
      lj.save(path, old, overwrite=True)
    out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and out.strip() == "saved", err[-3000:]
  got = {p: (np.asarray(d.a), np.asarray(d.b), d.scale)
         for p, d in lj.adapters(lj.load(path)).items()}
  matches = []
  for name in ("old", "new"):
    want = lj.adapters(child.adapter(name))
    matches.append(set(got) == set(want) and all(
        np.array_equal(got[p][0], want[p].a) and np.array_equal(
            got[p][1], want[p].b) and got[p][2] == want[p].scale
        for p in want))
  assert sum(matches) == 1, matches  # one writer's adapter, whole
  assert sorted(os.listdir(tmp_path)) == ["adapter", "go", "warm"]
