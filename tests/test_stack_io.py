"""lj.save_stack / lj.load_stack: a stack comes back bit for bit, each adapter
with its own rank, exact scale and config; the wrong loader is a clear
CheckpointError."""

import json
import os
import re

from cases import CASES
from helpers import randomize
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src.stack import stacks

RANKS = (2, 3, 1)
ALPHAS = (2.0, 5.0, 1.0)


def _stack(name="attention", **kw):
  case = CASES[name]
  cfgs = [lj.LoraConfig(rank=r, alpha=a, targets=case.targets, **kw)
          for r, a in zip(RANKS, ALPHAS)]
  ds = []
  for k, cfg in enumerate(cfgs):
    base, d = lj.split(case.params, cfg, jax.random.key(10 + k),
                       apply_fn=case.fn, example_args=case.args)
    ds.append(randomize(d, seed=k))
  return case, base, cfgs, ds, lj.stack(ds)


def _assert_same_stack(got, want):
  got, want = stacks(got), stacks(want)
  assert set(got) == set(want)
  for p, w in want.items():
    g = got[p]
    for name in ("a", "b", "magnitude"):
      x, y = getattr(g, name), getattr(w, name)
      assert (x is None) == (y is None), (p, name)
      if x is not None:
        assert x.dtype == y.dtype and x.shape == y.shape, (p, name)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert g.layout == w.layout and g.dropout == w.dropout
    assert g.scale == w.scale and g.residual_of == w.residual_of
    assert g.info.ranks == w.info.ranks


@pytest.mark.parametrize("name", ["attention", "scan_remat", "transposed"])
def test_roundtrip_bit_for_bit_with_each_adapters_metadata(tmp_path, name):
  case, base, cfgs, ds, stacked = _stack(name)
  path = lj.save_stack(tmp_path / "s", stacked, cfgs)
  back, configs = lj.load_stack(path, return_configs=True)
  _assert_same_stack(back, stacked)
  assert configs == cfgs
  q = next(iter(stacks(back).values()))
  assert q.info.ranks == RANKS
  assert q.scale == tuple(a / r for a, r in zip(ALPHAS, RANKS))
  # each adapter comes back out at its own rank, bit for bit
  for k, d in enumerate(ds):
    for p, want in lj.adapters(d).items():
      got = lj.adapters(lj.select(back, k))[p]
      assert got.rank == want.rank and got.scale == want.scale
      np.testing.assert_array_equal(np.asarray(got.a), np.asarray(want.a))
      np.testing.assert_array_equal(np.asarray(got.b), np.asarray(want.b))
  # and the mixed pass over the loaded stack is the same computation
  x = jnp.concatenate([case.args[0]] * 3)[:3]
  ids = jnp.array([2, -1, 0])
  apply = jax.jit(lj.wrap(case.fn))
  np.testing.assert_array_equal(apply(base, back, x, adapter_ids=ids),
                                apply(base, stacked, x, adapter_ids=ids))


def test_dora_stack_and_a_put_adapter_roundtrip(tmp_path):
  _, _, cfgs, ds, stacked = _stack("dense", dora=True)
  stacked = lj.put(stacked, 1, ds[2])  # rank 1 in a rank-3 slot
  path = lj.save_stack(tmp_path / "s", stacked, cfgs[0])
  back, configs = lj.load_stack(path, return_configs=True)
  _assert_same_stack(back, stacked)
  assert back["kernel"].info.ranks == (2, 1, 1)
  assert back["kernel"].magnitude.shape == (3, 6)
  assert configs == [cfgs[0]] * 3


def test_bf16_factors_and_no_configs(tmp_path):
  _, _, _, ds, _ = _stack("dense")
  ds = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), d) for d in ds]
  stacked = lj.stack(ds)
  back, configs = lj.load_stack(lj.save_stack(tmp_path / "s", stacked),
                                return_configs=True)
  _assert_same_stack(back, stacked)
  assert back["kernel"].a.dtype == jnp.bfloat16
  assert configs == [None, None, None]


def test_the_wrong_loader_is_a_checkpoint_error(tmp_path):
  _, _, cfgs, ds, stacked = _stack("dense")
  s = lj.save_stack(tmp_path / "s", stacked)
  with pytest.raises(lj.CheckpointError,
                     match=r"holds a stack of adapters; read it with "
                     r"lora_jax.load_stack"):
    lj.load(s)
  one = lj.save(tmp_path / "one", ds[0], cfgs[0])
  with pytest.raises(lj.CheckpointError,
                     match=r"holds one adapter, not a stack; read it with "
                     r"lora_jax.load"):
    lj.load_stack(one)


def _edit_meta(path, fn):
  meta_file = os.path.join(path, "lora_jax.json")
  with open(meta_file) as f:
    meta = json.load(f)
  fn(meta)
  with open(meta_file, "w") as f:
    json.dump(meta, f)


def test_corrupt_stack_description_names_the_field(tmp_path):
  _, _, _, _, stacked = _stack("dense")
  path = lj.save_stack(tmp_path / "s", stacked)

  def bad_rank(meta):
    meta["stack"]["adapters"][1]["paths"]["kernel"]["rank"] = 9
  _edit_meta(path, bad_rank)
  with pytest.raises(lj.CheckpointError,
                     match=r"stack.adapters\[1\].paths\['kernel'\] must hold "
                     r"a rank in 0..3"):
    lj.load_stack(path)

  def bad_size(meta):
    meta["stack"]["adapters"][1]["paths"]["kernel"]["rank"] = 3
    meta["stack"]["size"] = 4
  _edit_meta(path, bad_size)
  with pytest.raises(lj.CheckpointError,
                     match=r"the arrays at 'kernel' are not 4 adapters"):
    lj.load_stack(path)


def test_save_refuses_what_is_not_a_stack_and_keeps_overwrite_rules(tmp_path):
  _, _, cfgs, ds, stacked = _stack("dense")
  with pytest.raises(ValueError, match=r"holds no LoraStack"):
    lj.save_stack(tmp_path / "x", ds[0])
  with pytest.raises(ValueError, match=r"a list of 3 \(one per adapter"):
    lj.save_stack(tmp_path / "x", stacked, cfgs[:2])
  path = lj.save_stack(tmp_path / "s", stacked)
  with pytest.raises(FileExistsError, match=r"already exists; pass "
                     r"overwrite=True"):
    lj.save_stack(path, stacked)
  smaller = lj.stack(ds[:2])
  lj.save_stack(path, smaller, overwrite=True)
  _assert_same_stack(lj.load_stack(path), smaller)


def test_load_stack_onto_shardings(tmp_path):
  """Each factor and scale comes back on the placement asked for, bitwise."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ("x", "y"))
  stacked = _stack()[-1]
  path = lj.save_stack(str(tmp_path / "s"), stacked)

  def place(x):  # the first axis that "y" divides is split over it
    axis = next((i for i, n in enumerate(x.shape) if n % 2 == 0), None)
    spec = P() if axis is None else P(*([None] * axis), "y")
    return NamedSharding(mesh, spec)
  want = jax.tree.map(place, stacked)
  got = lj.load_stack(path, shardings=want)
  _assert_same_stack(got, stacked)
  split = 0
  for p, s in stacks(got).items():
    for field in ("a", "b"):
      arr = getattr(s, field)
      assert arr.sharding.is_equivalent_to(getattr(stacks(want)[p], field),
                                           arr.ndim), (p, field)
      split += not arr.sharding.is_fully_replicated
  assert split >= 4  # the test has teeth: factors really are split
  with pytest.raises(lj.CheckpointError, match="no adapter"):
    lj.load_stack(path, shardings={"nope": stacks(want)[next(iter(stacks(want)))]})


def test_shared_adapters_and_extras_roundtrip(tmp_path):
  """Everything wrap accepts as a stacked delta is saved: the stacks, single
  adapters beside them (shared by every row) and extras (trained base
  leaves, read back by load_extras); the loaded tree computes the same."""
  case, base, cfgs, ds, stacked = _stack("attention")
  shared = lj.adapters(ds[1])["out/kernel"]
  tree = {**stacked, "out": {"kernel": shared}}
  extras = {p: x + 0.5 for p, x in
            lj.trainable_leaves(base, r".*/bias").items()}
  assert len(extras) == 4
  path = lj.save_stack(tmp_path / "s", tree, cfgs, extras=extras)
  assert os.path.isfile(os.path.join(path, "lora_jax.json"))
  assert os.path.isdir(os.path.join(path, "arrays"))
  with open(os.path.join(path, "lora_jax.json")) as f:
    meta = json.load(f)
  assert sorted(meta["adapters"]) == ["key/kernel", "out/kernel",
                                      "query/kernel", "value/kernel"]
  assert sorted(meta["stack"]["layouts"]) == ["key/kernel", "query/kernel",
                                              "value/kernel"]
  assert sorted(meta["extras"]) == sorted(extras)
  back = lj.load_stack(path)
  _assert_same_stack(back, tree)
  got = back["out"]["kernel"]
  assert isinstance(got, lj.LoraDelta) and got.scale == shared.scale
  np.testing.assert_array_equal(np.asarray(got.a), np.asarray(shared.a))
  np.testing.assert_array_equal(np.asarray(got.b), np.asarray(shared.b))
  loaded_extras = lj.load_extras(path)
  assert sorted(loaded_extras) == sorted(extras)
  for p, x in extras.items():
    np.testing.assert_array_equal(np.asarray(loaded_extras[p]), np.asarray(x))
  x = jnp.concatenate([case.args[0]] * 3)[:3]
  ids = jnp.array([2, -1, 0])
  apply = jax.jit(lj.wrap(case.fn))
  want = apply(lj.with_leaves(base, extras), tree, x, adapter_ids=ids)
  np.testing.assert_array_equal(
      apply(lj.with_leaves(base, loaded_extras), back, x, adapter_ids=ids),
      want)
  # the shared adapter and extras do count: without them the output differs
  assert float(jnp.abs(apply(base, stacked, x, adapter_ids=ids) - want).max()
               ) > 1e-3
  # an extra that cannot come back whole is refused before anything is written
  q = lj.quantize({"w": jnp.ones((64, 64))}, targets="w")["w"]
  with pytest.raises(TypeError, match=r"lora_jax.save_stack: extras\['w'\] "
                     r"is a quantized kernel.*Nothing was written"):
    lj.save_stack(tmp_path / "q", tree, extras={"w": q})
  assert not (tmp_path / "q").exists()


def _is_w(path, leaf):
  return path == "w"


def test_load_stack_takes_back_callable_targets(tmp_path):
  params = {"w": jnp.ones((6, 4)), "v": jnp.ones((6, 4))}
  cfgs = [lj.LoraConfig(rank=r, targets=_is_w) for r in (1, 2)]
  ds = [lj.split(params, c, jax.random.key(0))[1] for c in cfgs]
  path = lj.save_stack(tmp_path / "s", lj.stack(ds), cfgs)
  with pytest.raises(lj.CheckpointError, match=re.escape(
      "lora_jax.load_stack: the config of adapter 0 in " + path + " cannot be "
      "read back: LoraConfig.from_json: targets was a callable (_is_w), which "
      "JSON cannot hold; pass it again: LoraConfig.from_json(data, "
      "targets=<the function>). load_stack takes such fields too: "
      "lora_jax.load_stack(path, return_configs=True, targets=<the "
      "function>).")):
    lj.load_stack(path, return_configs=True)
  back, configs = lj.load_stack(path, return_configs=True, targets=_is_w)
  assert configs == cfgs and [c.rank for c in configs] == [1, 2]
  assert list(back) == ["w"]
  with pytest.raises(TypeError, match=re.escape(
      "lora_jax.load_stack got unexpected keyword arguments ['target']; "
      "besides shardings and return_configs it takes LoraConfig fields")):
    lj.load_stack(path, return_configs=True, target=_is_w)
  with pytest.raises(TypeError, match=re.escape(
      "lora_jax.load_stack: ['targets'] set fields of the configs it returns; "
      "pass return_configs=True too.")):
    lj.load_stack(path, targets=_is_w)


def test_a_stack_saved_with_trained_scales_keeps_its_computation(tmp_path):
  """Stacks saved before scales were static may have trained them: the scale
  the computation used (scale_data) then differs from the exact one, and
  load_stack keeps the computation (as a static scale)."""
  stacked = lj.stack([{"w": lj.LoraDelta(jnp.ones((4, 1)), jnp.ones((1, 3)),
                                         scale=s)} for s in (0.1, 2.0)])
  path = lj.save_stack(tmp_path / "s", stacked)

  def trained(meta):
    meta["stack"]["adapters"][1]["paths"]["w"]["scale_data"] = 1.75
  _edit_meta(path, trained)
  assert lj.load_stack(path)["w"].scale == (0.1, 1.75)  # 0.1: exact
