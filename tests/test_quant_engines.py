"""``lj.wrap`` on a quantized or bf16 frozen base (both engines).

* ``wrap(f, mode)(qbase, ...)`` equals ``wrap(f, mode)(dequantize(qbase),
  ...)``, values and gradients (delta and x), for merge / factored / auto, nf4
  and int8, with and without double quant, on 2-D kernels and a scanned stack;
* the wrapped function sees float kernels of the right shape, never codes;
* a Flax model under ``nn.scan`` trains through the factored engine on nf4,
  and QLoRA training lowers the loss;
* compiled memory: a LoRA step on an nf4 base holds <= 0.35x the float base's
  arguments, and a bf16 or nf4 base's arguments + temp are no more than the
  float32 base's (the narrow kernel is widened at its point of use only).
"""

import flax.linen as nn
from helpers import tanh_stack
from helpers import train_mse
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj


def _model():
  k = jax.random.split(jax.random.key(0), 5)
  params = {"l1": {"kernel": jax.random.normal(k[0], (64, 128)) * 0.1,
                   "bias": jnp.zeros(128)},
            "l2": {"kernel": jax.random.normal(k[1], (128, 64)) * 0.1},
            "stack": jax.random.normal(k[2], (3, 64, 64)) * 0.1,
            "head": jax.random.normal(k[3], (64, 8)) * 0.1}

  def fn(p, x):
    h = jax.nn.gelu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = h @ p["l2"]["kernel"]
    h = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])[0]
    return h @ p["head"]
  x = jax.random.normal(k[4], (16, 64))
  return params, fn, x


def _split(params, fn, x):
  base, delta = lj.split(params, lj.LoraConfig(rank=4, targets=r".*kernel|stack"),
                         jax.random.key(1), apply_fn=fn, example_args=(x,))
  # non-zero b, so the update is visible
  delta = jax.tree.map(
      lambda d: d.replace(b=0.1 * jax.random.normal(jax.random.key(d.b.size),
                                                    d.b.shape))
      if isinstance(d, lj.LoraDelta) else d, delta,
      is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  return base, delta


# Pairwise, not the full 3 x 2 x 2 matrix: every pair of (engine, scheme),
# (engine, double_quant) and (scheme, double_quant) values occurs once.
PAIRWISE = [("merge", "nf4", False), ("merge", "int8", True),
            ("factored", "nf4", True), ("factored", "int8", False),
            ("auto", "nf4", False), ("auto", "int8", True)]


def test_the_matrix_is_pairwise():
  for i, j in ((0, 1), (0, 2), (1, 2)):
    want = {(a, b) for a in ({"merge", "factored", "auto"}, {"nf4", "int8"},
                             {False, True})[i]
            for b in ({"merge", "factored", "auto"}, {"nf4", "int8"},
                      {False, True})[j]}
    assert {(c[i], c[j]) for c in PAIRWISE} == want


@pytest.mark.parametrize("mode, scheme, double_quant", PAIRWISE)
def test_wrap_on_a_quantized_base_equals_its_dequantized_copy(mode, scheme,
                                                              double_quant):
  params, fn, x = _model()
  base, delta = _split(params, fn, x)
  qbase = lj.quantize(base, scheme, block_size=32, delta=delta,
                      double_quant=double_quant)
  assert isinstance(qbase["stack"], lj.QArray) and qbase["stack"].axis == 1
  floats = lj.dequantize(qbase)
  apply = lj.wrap(fn, mode)
  loss = lambda b, d, x: jnp.sum(apply(b, d, x) ** 2)
  np.testing.assert_allclose(jax.jit(apply)(qbase, delta, x),
                             jax.jit(apply)(floats, delta, x), rtol=1e-5,
                             atol=1e-6)
  gq = jax.jit(jax.grad(loss, argnums=(1, 2)))(qbase, delta, x)
  gf = jax.jit(jax.grad(loss, argnums=(1, 2)))(floats, delta, x)
  for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gf)):
    np.testing.assert_allclose(a, b, rtol=5e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["merge", "factored"])
def test_the_function_sees_float_kernels(mode):
  params, fn, x = _model()
  base, delta = _split(params, fn, x)
  qbase = lj.quantize(base, "nf4", block_size=32, delta=delta)
  seen = {}

  def spy(p, x):
    seen.update({k: (v.shape, v.dtype) for k, v in
                 (("l1", p["l1"]["kernel"]), ("stack", p["stack"]))})
    return fn(p, x)
  jax.eval_shape(lj.wrap(spy, mode), qbase, delta, x)
  assert seen == {"l1": ((64, 128), jnp.float32),
                  "stack": ((3, 64, 64), jnp.float32)}


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(64, name="fc2")(nn.gelu(nn.Dense(128, name="fc1")(x))), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(8, name="head")(x)


def test_qlora_trains_a_scanned_flax_model_through_the_factored_engine():
  model = _Scanned()
  x = jax.random.normal(jax.random.key(0), (32, 64))
  y = jnp.sin(3 * x[:, :8])
  params = model.init(jax.random.key(1), x)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  base, delta = lj.split(params, lj.LoraConfig(rank=8, targets=r".*fc\d/kernel"),
                         jax.random.key(2), apply_fn=fn, example_args=(x,))
  qbase = lj.quantize(base, "nf4", block_size=64, delta=delta,
                      targets=r".*fc\d/kernel", double_quant=True)
  assert repr(qbase["blocks"]["fc1"]["kernel"]) == (
      "QArray(nf4, f32[3,64,128], block 64, axis 1, double quant)")
  factored = train_mse(lj.wrap(fn, "factored"), qbase, delta, x, y)
  merged = train_mse(lj.wrap(fn, "merge"), qbase, delta, x, y)
  assert factored[-1] < 0.5 * factored[0], factored[::10]
  np.testing.assert_allclose(factored, merged, rtol=2e-3)


def _memory(apply, base, delta, x):
  tx = optax.adam(1e-3)

  def step(state, base, x):
    d, opt = state
    l, g = jax.value_and_grad(lambda d: jnp.sum(apply(base, d, x) ** 2))(d)
    u, opt = tx.update(g, opt, d)
    return (optax.apply_updates(d, u), opt), l
  mem = jax.jit(step, donate_argnums=0).lower(
      (delta, tx.init(delta)), base, x).compile().memory_analysis()
  return mem.argument_size_in_bytes, mem.temp_size_in_bytes


def _wide():
  """Four 1024 x 1024 kernels, 8 tokens: the parameters dominate."""
  return tanh_stack(1024, 0.03)


@pytest.mark.parametrize("mode", ["factored", "auto"])
def test_an_nf4_base_step_holds_a_third_of_the_float_one(mode):
  fn, base, delta, x = _wide()
  apply = lj.wrap(fn, mode)
  f_args, f_temp = _memory(apply, base, delta, x)
  q_args, q_temp = _memory(apply, lj.quantize(base, "nf4"), delta, x)
  assert q_args <= 0.35 * f_args, (q_args, f_args)
  assert q_args + q_temp <= f_args + f_temp, (q_args, q_temp, f_args, f_temp)


@pytest.mark.parametrize("mode", ["factored", "auto"])
def test_a_bf16_base_step_is_no_larger_than_a_float32_one(mode):
  fn, base, delta, x = _wide()
  apply = lj.wrap(fn, mode)
  f_args, f_temp = _memory(apply, base, delta, x)
  b_args, b_temp = _memory(
      apply, jax.tree.map(lambda w: w.astype(jnp.bfloat16), base), delta, x)
  # the step holds the bf16 base in place of the float32 one, nothing more
  half = sum(w.nbytes for w in jax.tree.leaves(base)) // 2
  assert b_args == f_args - half, (b_args, f_args, half)
  assert b_args + b_temp <= f_args + f_temp, (b_args, b_temp, f_args, f_temp)


def test_dora_norms_of_a_quantized_base_equal_its_dequantized_copy():
  w = jax.random.normal(jax.random.key(0), (64, 8))
  base, delta = lj.split({"w": w}, lj.LoraConfig(rank=2, targets="w", dora=True),
                         jax.random.key(1))
  q = lj.quantize(base, "nf4", block_size=32)
  np.testing.assert_array_equal(lj.dora_norms(q, delta)["w"],
                                lj.dora_norms(lj.dequantize(q), delta)["w"])
