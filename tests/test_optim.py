from cases import CASES
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _mlp():
  case = CASES["nnx_linear"]
  base, delta = case.split(rank=2)
  return case, base, delta


@pytest.mark.parametrize("name", ["dense", "attention", "nnx_linear", "plain"])
def test_state_holds_only_factor_moments(name):
  case = CASES[name]
  base, delta = case.split(rank=2)
  state = lj.optimizer(optax.adam(1e-3)).init((base, delta))
  factor_bytes = _nbytes(delta)
  count_bytes = 4  # adam's int32 step count
  assert _nbytes(state) == 2 * factor_bytes + count_bytes
  # and the canonical delta-only loop holds exactly the same
  assert _nbytes(optax.adam(1e-3).init(delta)) == 2 * factor_bytes + count_bytes


def test_trainable_base_leaves_get_state_and_updates():
  case, base, delta = _mlp()
  tx = lj.optimizer(optax.adam(1e-2), trainable=r".*/bias")
  state = tx.init((base, delta))
  bias_bytes = sum(x.nbytes for p, x in lj.leaves_with_paths(base)
                   if p.endswith("bias"))
  assert _nbytes(state) == 2 * (_nbytes(delta) + bias_bytes) + 4

  x = case.args[0]
  loss = lambda b, d: jnp.mean(lj.wrap(case.fn)(b, d, x) ** 2)
  params = (base, delta)
  before = jax.tree.map(np.array, params)
  for i in range(3):
    grads = jax.grad(lambda bd: loss(*bd))(params)
    if i == 0:  # the pair's frozen kernels have gradients: said once
      with pytest.warns(UserWarning, match=r"non-zero gradients for 2 frozen "
                        r"base leaves, e.g. \['fc1/kernel', 'fc2/kernel'\]"):
        updates, state = tx.update(grads, state, params)
    else:
      updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  # frozen kernels: bitwise unchanged; biases and factors moved
  for (p, x0), (_, x1) in zip(lj.leaves_with_paths(before[0]),
                              lj.leaves_with_paths(params[0])):
    if p.endswith("kernel"):
      np.testing.assert_array_equal(x0, np.asarray(x1))
    else:
      assert not np.array_equal(x0, np.asarray(x1)), p
  for d0, d1 in zip(jax.tree.leaves(before[1]), jax.tree.leaves(params[1])):
    assert not np.array_equal(d0, np.asarray(d1))


def test_frozen_updates_are_zero():
  case, base, delta = _mlp()
  tx = lj.optimizer(optax.sgd(1.0))
  grads = jax.tree.map(jnp.ones_like, (base, delta))
  with pytest.warns(UserWarning, match="non-zero gradients for 4 frozen"):
    updates, _ = tx.update(grads, tx.init((base, delta)), (base, delta))
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates[0]))
  assert all(np.all(np.asarray(u) == -1.0) for u in jax.tree.leaves(updates[1]))


def test_optimizer_errors():
  case, base, delta = _mlp()
  with pytest.raises(ValueError, match=r"trainable: the regex 'head/.*' matches no base leaf path.*fc1/bias"):
    lj.optimizer(optax.adam(1e-3), trainable=r"head/.*").init((base, delta))
  with pytest.raises(TypeError, match=r"pair \(base, delta\)"):
    lj.optimizer(optax.adam(1e-3)).init(delta)
