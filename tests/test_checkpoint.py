import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj
from cases import CASES
from helpers import randomize


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
