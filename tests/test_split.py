import math

from cases import CASES
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


@pytest.mark.parametrize("name", list(CASES))
def test_traced_layouts(name):
  case = CASES[name]
  base, delta = case.split(rank=2)
  found = {p: d.layout for p, d in lj.adapters(delta).items()}
  assert found == case.layouts
  # base holds the very same arrays; delta mirrors the structure
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(case.params)):
    assert x is y
  assert (jax.tree.structure(delta, is_leaf=lambda x: x is None or isinstance(x, lj.LoraDelta))
          == jax.tree.structure(jax.tree.map(lambda _: 0, case.params)))
  for path, d in lj.adapters(delta).items():
    kernel = dict(lj.leaves_with_paths(case.params))[path]
    assert d.kernel_shape == kernel.shape
    a_shape, b_shape = d.layout.factor_shapes(kernel.shape, 2)
    assert d.a.shape == a_shape and d.b.shape == b_shape
    assert d.scale == 1.5


def test_default_init_matches_peft():
  params = {"fc": {"kernel": jnp.zeros((400, 300))}}
  _, delta = lj.split(params, lj.LoraConfig(rank=16), jax.random.key(0))
  d = delta["fc"]["kernel"]
  bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) over fan-in
  a = np.asarray(d.a)
  assert a.dtype == np.float32 and np.abs(a).max() <= bound
  assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b)
  assert not np.any(np.asarray(d.b))
  _, g = lj.split(params, lj.LoraConfig(rank=16, init="gaussian"),
                  jax.random.key(0))
  assert abs(np.asarray(g["fc"]["kernel"].a).std() - 1 / 16) < 0.003


def test_conv_fan_in_includes_spatial():
  params = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8))}}
  cfg = lj.LoraConfig(rank=2, layouts={".*": lj.Layout((), (0, 1, 2), (3,))})
  _, delta = lj.split(params, cfg, jax.random.key(0))
  assert np.abs(np.asarray(delta["conv"]["kernel"].a)).max() <= 1 / 6


def test_split_is_pure_and_deterministic():
  params = {"a": {"kernel": jnp.ones((8, 8))}, "b": {"kernel": jnp.ones((8, 8))}}
  cfg = lj.LoraConfig(rank=2)
  _, d1 = lj.split(params, cfg, jax.random.key(3))
  _, d2 = lj.split(params, cfg, jax.random.key(3))
  chex.assert_trees_all_equal(d1, d2)
  # different leaves get different random factors
  assert not np.array_equal(d1["a"]["kernel"].a, d1["b"]["kernel"].a)
  # traceable: works under jit and eval_shape (shapes alone)
  abstract = jax.eval_shape(lambda p: lj.split(p, cfg, jax.random.key(0))[1],
                            params)
  assert abstract["a"]["kernel"].a.shape == (8, 2)


def test_factor_dtype():
  params = {"fc": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}
  _, d = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(0))
  assert d["fc"]["kernel"].a.dtype == jnp.float32  # factors upcast by default
  _, d = lj.split(params, lj.LoraConfig(rank=2, dtype=jnp.bfloat16),
                  jax.random.key(0))
  assert d["fc"]["kernel"].b.dtype == jnp.bfloat16


def test_nnx_state_paths_and_structure():
  case = CASES["nnx_linear"]
  base, delta = case.split()
  assert isinstance(delta, nnx.State)
  assert isinstance(delta["fc1"]["kernel"], nnx.Param)
  assert isinstance(delta["fc1"]["kernel"].value, lj.LoraDelta)
  assert delta["fc1"]["bias"].value is None
  assert set(lj.adapters(delta)) == {"fc1/kernel", "fc2/kernel"}


def test_explicit_layout_wins_and_is_checked():
  params = {"w": jnp.ones((6, 4))}
  cfg = lj.LoraConfig(rank=2, targets="w", layouts={"w": lj.Layout.transposed()})
  _, d = lj.split(params, cfg, jax.random.key(0))
  assert d["w"].a.shape == (4, 2) and d["w"].b.shape == (2, 6)
  bad = lj.LoraConfig(rank=2, targets="w",
                      layouts={"w": lj.Layout((0,), (1,), (2,))})
  with pytest.raises(ValueError, match=r"layout for 3 axes .* shape \(6, 4\)"):
    lj.split(params, bad, jax.random.key(0))


# ---- errors name the leaf and the remedy ---------------------------------

def test_regex_matching_nothing_lists_paths():
  params = {"enc": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match=r"'.*/query/kernel' matches no leaf.*'enc/kernel'"):
    lj.split(params, lj.LoraConfig(targets=[r"enc/kernel", r".*/query/kernel"]),
             jax.random.key(0))
  with pytest.raises(ValueError, match="selects no leaf"):
    lj.split(params, lj.LoraConfig(targets=lambda p, x: False), jax.random.key(0))


def test_rank_too_large_names_leaf():
  params = {"small": {"kernel": jnp.ones((3, 64))}}
  with pytest.raises(ValueError, match=r"rank 4 .* smaller side \(3\) of 'small/kernel'"):
    lj.split(params, lj.LoraConfig(rank=4), jax.random.key(0))


def test_non_float_and_1d_targets():
  with pytest.raises(TypeError, match="'ids/kernel' is not a floating-point"):
    lj.split({"ids": {"kernel": jnp.ones((4, 4), jnp.int32)}},
             lj.LoraConfig(rank=2), jax.random.key(0))
  with pytest.raises(ValueError, match="'b' has shape \\(4,\\); LoRA needs"):
    lj.split({"b": jnp.ones(4)}, lj.LoraConfig(targets="b"), jax.random.key(0))


def test_nd_kernel_without_trace_is_an_error():
  params = {"q": {"kernel": jnp.ones((8, 2, 4))}}
  with pytest.raises(ValueError, match="Cannot tell the layout of 'q/kernel'.*apply_fn"):
    lj.split(params, lj.LoraConfig(rank=2), jax.random.key(0))


def test_untraceable_consumer_is_an_error():
  params = {"w": jnp.ones((4, 4))}
  f = lambda p, x: x * jnp.sum(p["w"] ** 2)
  with pytest.raises(ValueError, match="Cannot infer the layout of 'w'.*integer_pow"):
    lj.split(params, lj.LoraConfig(rank=2, targets="w"), jax.random.key(0),
             apply_fn=f, example_args=(jnp.ones(4),))


def test_conflicting_uses_are_an_error():
  params = {"w": jnp.ones((4, 4))}
  f = lambda p, x: x @ p["w"] + x @ p["w"].T
  with pytest.raises(ValueError, match="'w' is consumed with conflicting layouts"):
    lj.split(params, lj.LoraConfig(rank=2, targets="w"), jax.random.key(0),
             apply_fn=f, example_args=(jnp.ones(4),))


def test_more_error_messages():
  with pytest.raises(TypeError, match="split expects a lora_jax.LoraConfig"):
    lj.split({"w": jnp.ones((4, 4))}, {"rank": 2}, jax.random.key(0))
  bad_init = lambda key, a_shape, b_shape, dtype, fan_in: (
      jnp.zeros((1, 1)), jnp.zeros(b_shape))
  with pytest.raises(ValueError, match=r"init callable returned shapes \(1, 1\)"):
    lj.split({"w": jnp.ones((4, 4))}, lj.LoraConfig(rank=2, targets="w",
                                                    init=bad_init),
             jax.random.key(0))
  ok_init = lambda key, a_shape, b_shape, dtype, fan_in: (
      jnp.full(a_shape, 1.0 / fan_in), jnp.zeros(b_shape))
  _, d = lj.split({"w": jnp.ones((4, 4))}, lj.LoraConfig(rank=2, targets="w",
                                                         init=ok_init),
                  jax.random.key(0))
  np.testing.assert_array_equal(d["w"].a, np.full((4, 2), 0.25))
  with pytest.raises(ValueError, match="the delta holds no LoraDelta"):
    lj.save("/tmp/never-written", {"w": None})
