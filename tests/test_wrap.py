import functools

from cases import CASES
import chex
from helpers import randomize
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj


def _float_out(y):
  return [np.asarray(v) for v in jax.tree.leaves(y)]


@pytest.mark.parametrize("name", list(CASES))
def test_identity_at_init_bit_for_bit(name):
  case = CASES[name]
  base, delta = case.split(rank=2)
  want = jax.jit(case.fn)(case.params, *case.args)
  got = jax.jit(lj.wrap(case.fn))(base, delta, *case.args)
  for g, w in zip(_float_out(got), _float_out(want)):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", list(CASES))
def test_wrap_equals_fn_of_merge(name):
  case = CASES[name]
  base, delta = case.split(rank=2)
  delta = randomize(delta)
  got = jax.jit(lj.wrap(case.fn, mode="merge"))(base, delta, *case.args)
  want = case.fn(lj.merge(base, delta), *case.args)
  for g, w in zip(_float_out(got), _float_out(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  plain = case.fn(case.params, *case.args)
  assert any(not np.allclose(g, p) for g, p in
             zip(_float_out(got), _float_out(plain)))


def test_modes():
  f = lambda p, x: x @ p["k"]
  with pytest.raises(ValueError, match="mode must be one of"):
    lj.wrap(f, mode="fast")


def _loss_fn(case, apply):
  def loss(base, delta, *args):
    out = apply(base, delta, *args)
    return sum(jnp.mean((o.astype(jnp.float32) - 0.5) ** 2)
               for o in jax.tree.leaves(out) if jnp.issubdtype(o.dtype, jnp.floating))
  return loss


@pytest.mark.parametrize("name", list(CASES))
def test_training_moves_factors_only(name):
  """Adam on the delta alone, under jit + grad with the delta donated."""
  case = CASES[name]
  base, delta = case.split(rank=2)
  loss = _loss_fn(case, lj.wrap(case.fn))
  tx = optax.adam(3e-2)
  opt_state = tx.init(delta)
  base_before = jax.tree.map(np.array, base)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(delta, opt_state, base, args):
    value, g = jax.value_and_grad(lambda d: loss(base, d, *args))(delta)
    updates, opt_state = tx.update(g, opt_state, delta)
    return optax.apply_updates(delta, updates), opt_state, value

  a0 = {p: np.array(d.a) for p, d in lj.adapters(delta).items()}
  losses = []
  for _ in range(8):
    delta, opt_state, value = step(delta, opt_state, base, case.args)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  for p, d in lj.adapters(delta).items():
    assert not np.array_equal(np.asarray(d.a), a0[p]), p
    assert np.any(np.asarray(d.b)), p
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, base), base_before)


def test_vmap_over_a_batch_axis():
  case = CASES["attention"]
  base, delta = case.split(rank=2)
  delta = randomize(delta)
  apply = lj.wrap(case.fn)
  x = case.args[0]
  per_example = jax.vmap(lambda xi: apply(base, delta, xi[None])[0])(x)
  np.testing.assert_allclose(per_example, apply(base, delta, x), rtol=1e-5,
                             atol=1e-6)
  # vmap over a batch of adapters: each gives the model with its own delta
  deltas = jax.tree.map(lambda *xs: jnp.stack(xs), delta,
                        randomize(delta, seed=1))
  outs = jax.vmap(lambda d: apply(base, d, x))(deltas)
  np.testing.assert_allclose(outs[1], apply(base, randomize(delta, seed=1), x),
                             rtol=1e-5, atol=1e-6)


def test_grad_of_wrapped_matches_chain_rule():
  """d/dA of sum(x @ (W + s A B)) is s * x^T 1 B^T, by hand."""
  w = jnp.zeros((3, 2))
  base, delta = lj.split({"k": w}, lj.LoraConfig(rank=1, alpha=2.0, targets="k"),
                         jax.random.key(0))
  delta = {"k": delta["k"].replace(b=jnp.array([[1.0, 3.0]]))}
  x = jnp.array([[1.0, 2.0, 4.0]])
  g = jax.grad(lambda d: lj.wrap(lambda p, x: (x @ p["k"]).sum())(base, d, x))(delta)
  np.testing.assert_allclose(np.asarray(g["k"].a)[:, 0], 2.0 * 4.0 * np.array([1, 2, 4]))
