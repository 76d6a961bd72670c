from cases import CASES
from helpers import numpy_delta_weight
from helpers import randomize
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_numpy_and_unmerge_inverts(name):
  case = CASES[name]
  base, delta = case.split(rank=2)
  delta = randomize(delta)
  merged = jax.jit(lj.merge)(base, delta)
  deltas = lj.adapters(delta)
  flat_base = dict(lj.leaves_with_paths(base))
  for path, w in lj.leaves_with_paths(merged):
    w0 = np.asarray(flat_base[path], np.float64)
    if path in deltas:
      want = w0 + numpy_delta_weight(deltas[path])
      np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5, atol=1e-6)
      assert not np.allclose(np.asarray(w), w0)  # the update is visible
    else:
      np.testing.assert_array_equal(np.asarray(w), w0)  # untouched leaves
  restored = lj.unmerge(merged, delta)
  for (p, x), (_, y) in zip(lj.leaves_with_paths(restored),
                            lj.leaves_with_paths(base)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6,
                               err_msg=p)


def test_delta_weight_method_matches_numpy():
  a = jax.random.normal(jax.random.key(0), (3, 5, 2))
  b = jax.random.normal(jax.random.key(1), (3, 2, 4))
  d = lj.LoraDelta(a, b, scale=0.5, layout=lj.Layout((0,), (1,), (2,)))
  np.testing.assert_allclose(np.asarray(d.weight()), numpy_delta_weight(d),
                             rtol=1e-5, atol=1e-6)
  # a hand computation: layer 1, row 2, column 3
  want = 0.5 * sum(float(a[1, 2, r]) * float(b[1, r, 3]) for r in range(2))
  assert abs(float(d.weight()[1, 2, 3]) - want) < 1e-5


def test_merge_keeps_base_dtype_and_rounds_once():
  w = jax.random.normal(jax.random.key(0), (16, 16)).astype(jnp.bfloat16)
  base, delta = lj.split({"k": w}, lj.LoraConfig(rank=4, targets="k"),
                         jax.random.key(1))
  delta = randomize(delta)
  merged = lj.merge(base, delta)["k"]
  assert merged.dtype == jnp.bfloat16
  exact = np.asarray(w, np.float64) + numpy_delta_weight(delta["k"])
  np.testing.assert_array_equal(
      np.asarray(merged, np.float32),
      np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16),
                 np.float32))


@pytest.mark.parametrize("factor_dtype,scale", [(jnp.bfloat16, 16 / 6),
                                                (jnp.float16, 3e5)])
def test_narrow_factors_on_a_float32_kernel_merge_in_float32(factor_dtype,
                                                              scale):
  """The update of bf16 / f16 factors on a float32 kernel is computed in
  float32: not rounded to bf16 on the way (0.4% low on every element
  before, for the scale 16/6), and an f16 product beyond 65504 is no NaN.
  Both engines then equal the float64 math."""
  k = jax.random.split(jax.random.key(0), 3)
  w = jax.random.normal(k[0], (12, 10))
  a = (jax.random.normal(k[1], (12, 3)) * 0.5).astype(factor_dtype)
  b = (jax.random.normal(k[2], (3, 10)) * 0.5).astype(factor_dtype)
  d = lj.LoraDelta(a, b, scale=scale)
  want = np.asarray(w, np.float64) + scale * (
      np.asarray(a, np.float64) @ np.asarray(b, np.float64))
  merged = lj.merge({"w": w}, {"w": d})["w"]
  assert merged.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(merged), want, rtol=2e-6, atol=1e-6)
  x = jax.random.normal(jax.random.key(5), (4, 12))
  fn = lambda p, x: x @ p["w"]
  for mode in ("merge", "factored"):
    got = jax.jit(lj.wrap(fn, mode))({"w": w}, {"w": d}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x, np.float64)
                               @ want, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=mode)


def test_merge_keeps_sharding():
  w = jax.device_put(jnp.ones((8, 8)), jax.devices()[0])
  base, delta = lj.split({"k": w}, lj.LoraConfig(rank=2, targets="k"),
                         jax.random.key(1))
  assert lj.merge(base, randomize(delta))["k"].sharding == w.sharding


def test_mismatched_base_names_leaf():
  _, delta = lj.split({"fc": {"kernel": jnp.ones((8, 4))}},
                      lj.LoraConfig(rank=2), jax.random.key(0))
  with pytest.raises(ValueError, match=r"mismatch at 'fc/kernel'.*\(8, 4\).*\(8, 5\)"):
    lj.merge({"fc": {"kernel": jnp.ones((8, 5))}}, delta)
  with pytest.raises(ValueError, match=r"adapters at \['fc/kernel'\] but the base has no leaf"):
    lj.merge({"other": {"kernel": jnp.ones((8, 4))}}, delta)
  with pytest.raises(ValueError, match="mismatch at 'fc/kernel'"):
    lj.wrap(lambda p, x: x @ p["fc"]["kernel"])(
        {"fc": {"kernel": jnp.ones((8, 5))}}, delta, jnp.ones(8))
