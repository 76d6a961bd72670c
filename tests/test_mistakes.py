"""Mistakes users make that used to pass silently: each is now an error that
says what to do, or simply works (issue 11, "silently wrong")."""

import contextlib
import re
import tempfile
import typing
import warnings

from flax import linen as nn
from flax import nnx
from helpers import numpy_delta_weight
from helpers import randomize
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import lora_jax as lj


def _mlp():
  k = jax.random.split(jax.random.key(0), 2)
  params = {"fc": {"kernel": jax.random.normal(k[0], (8, 4)),
                   "bias": jnp.zeros(4)}}
  base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(1))
  fn = lambda p, x: x @ p["fc"]["kernel"] + p["fc"]["bias"]
  return params, base, randomize(delta), fn, jax.random.normal(k[1], (3, 8))


# Swapped or missing arguments ----------------------------------------------

def test_swapped_merge_and_unmerge_arguments_are_errors():
  params, base, delta, _, _ = _mlp()
  swapped = (r"merge: the arguments look swapped: the base \(first tree\) "
             r"holds LoraDelta adapters at \['fc/kernel'\] and the delta "
             r"\(second tree\) holds none. Call merge\(base, delta\): the "
             r"base \(frozen parameters\) first")
  with pytest.raises(ValueError, match=swapped):
    lj.merge(delta, base)
  with pytest.raises(ValueError, match=r"unmerge: the arguments look swapped: "
                     r"the params \(first tree\).*Call unmerge\(params, delta\)"):
    lj.unmerge(delta, params)
  with pytest.raises(ValueError, match=r"merge: the base \(first tree\) holds "
                     r"LoraDelta adapters at \['fc/kernel'\]; it must be plain "
                     r"parameters"):
    lj.merge(delta, delta)
  for empty in ({}, params, {"fc": {"kernel": None, "bias": None}}):
    with pytest.raises(ValueError, match=r"merge: the delta \(second tree\) "
                       r"holds no LoraDelta, so there is nothing to apply"):
      lj.merge(base, empty)


@pytest.mark.parametrize("mode", ["auto", "factored", "merge"])
def test_wrap_with_params_as_delta_is_an_error(mode):
  params, base, delta, fn, x = _mlp()
  what = "merge" if mode == "merge" else "wrap"  # the merge engine merges
  with pytest.raises(ValueError, match=rf"{what}: the delta \(second tree\) "
                     r"holds no LoraDelta"):
    lj.wrap(fn, mode)(base, params, x)
  with pytest.raises(ValueError, match=rf"{what}: the arguments look swapped"):
    jax.jit(lj.wrap(fn, mode))(delta, base, x)
  # the right order still gives f(merge(base, delta))
  np.testing.assert_allclose(lj.wrap(fn, mode)(base, delta, x),
                             fn(lj.merge(base, delta), x), rtol=1e-5)


def test_explain_with_swapped_arguments_is_an_error():
  _, base, delta, fn, x = _mlp()
  with pytest.raises(ValueError, match=r"explain: the arguments look swapped"
                     r".*Call explain\(fn, base, delta, \*args\)"):
    lj.explain(fn, delta, base, x)


# Paths ---------------------------------------------------------------------

class Box(typing.NamedTuple):
  value: typing.Any
  kernel: typing.Any


def test_a_namedtuple_field_named_value_keeps_its_name():
  k = jax.random.split(jax.random.key(0), 2)
  # Before: both kernels were named "fc/kernel" and one adapter hit both.
  params = {"fc": Box(value={"kernel": jax.random.normal(k[0], (6, 4))},
                      kernel=jax.random.normal(k[1], (6, 4)))}
  assert [p for p, _ in lj.leaves_with_paths(params)] == [
      "fc/value/kernel", "fc/kernel"]
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="fc/kernel"),
                         jax.random.key(1))
  assert list(lj.adapters(delta)) == ["fc/kernel"]
  merged = lj.merge(base, randomize(delta))
  np.testing.assert_array_equal(merged["fc"].value["kernel"],
                                params["fc"].value["kernel"])
  np.testing.assert_allclose(
      merged["fc"].kernel, np.asarray(params["fc"].kernel, np.float64)
      + numpy_delta_weight(lj.adapters(randomize(delta))["fc/kernel"]),
      rtol=1e-5, atol=1e-6)
  # a dict key named "value" is a segment too
  assert [p for p, _ in lj.leaves_with_paths({"value": {"w": 1}})] == ["value/w"]


def test_nnx_and_partitioned_paths_leave_out_value():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(4, 4, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
  _, state = nnx.split(Net(nnx.Rngs(0, dropout=1)))
  assert [p for p, _ in lj.leaves_with_paths(state)] == [
      "drop/rngs/count", "drop/rngs/key", "fc1/bias", "fc1/kernel"]
  boxed = {"k": nn.Partitioned(jnp.ones((2, 2)), names=("a", "b"))}
  assert [p for p, _ in lj.leaves_with_paths(boxed)] == ["k"]


def test_two_leaves_with_one_path_are_an_error():
  w = jnp.ones((4, 4))
  params = {"a/kernel": w, "a": {"kernel": 2 * w}}
  msg = (r"Two leaves have the same path 'a/kernel': tree\['a'\]\['kernel'\] "
         r"and tree\['a/kernel'\]. lora_jax finds kernels and adapters by "
         r"path, so one adapter would apply to both. Rename one of them.")
  with pytest.raises(ValueError, match=msg):
    lj.split(params, lj.LoraConfig(rank=1), jax.random.key(0))
  base, delta = lj.split({"a": {"kernel": w}}, lj.LoraConfig(rank=1),
                         jax.random.key(0))
  with pytest.raises(ValueError, match=msg):
    lj.merge(params, delta)
  with pytest.raises(ValueError, match=msg):
    lj.wrap(lambda p, x: x @ p["a"]["kernel"])(params, delta, jnp.ones(4))


# A sharded base and a plainly loaded delta ---------------------------------

def test_merge_places_a_plainly_loaded_delta_like_the_sharded_base():
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))
  k = jax.random.split(jax.random.key(0), 2)
  params = {"w1": jax.random.normal(k[0], (16, 32)),
            "w2": jax.random.normal(k[1], (32, 8))}
  specs = {"w1": P("data", "model"), "w2": P("model", None)}
  sbase = {n: jax.device_put(x, NamedSharding(mesh, specs[n]))
           for n, x in params.items()}
  base, delta = lj.split(sbase, lj.LoraConfig(rank=2, targets="w.*"),
                         jax.random.key(1))
  delta = randomize(delta)
  with tempfile.TemporaryDirectory() as tmp:
    loaded = lj.load(lj.save(tmp + "/adapter", delta))  # README's recipe
  assert len(lj.adapters(loaded)["w1"].a.sharding.device_set) == 1
  merged = lj.merge(base, loaded)
  for n in params:
    assert merged[n].sharding.is_equivalent_to(
        NamedSharding(mesh, specs[n]), 2), n
    want = np.asarray(params[n], np.float64) + numpy_delta_weight(
        lj.adapters(delta)[n])
    np.testing.assert_allclose(np.asarray(merged[n]), want, rtol=1e-5,
                               atol=1e-5)
  # unmerge too; and a base on another single device
  restored = lj.unmerge(merged, loaded)
  np.testing.assert_allclose(np.asarray(restored["w1"]), params["w1"],
                             atol=1e-5)
  on3 = jax.device_put(params, jax.devices()[3])
  merged3 = lj.merge(on3, loaded)
  assert merged3["w2"].sharding.device_set == {jax.devices()[3]}
  np.testing.assert_allclose(np.asarray(merged3["w2"]),
                             np.asarray(merged["w2"]), rtol=1e-6)


# optax composition ---------------------------------------------------------

def _pair_grads(base, delta, fn, x):
  loss = lambda bd: jnp.sum(fn(lj.merge(*bd), x) ** 2)
  return jax.grad(loss)((base, delta))


def test_clipping_inside_the_optimizer_equals_delta_only_clipping():
  _, base, delta, fn, x = _mlp()
  grads = _pair_grads(base, delta, fn, x)
  clip = lambda: optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(1.0))
  tx = lj.optimizer(clip())
  with pytest.warns(UserWarning, match=r"non-zero gradients for 2 frozen base "
                    r"leaves, e.g. \['fc/bias', 'fc/kernel'\].*Put such "
                    r"transformations inside: lora_jax.optimizer\(optax.chain"):
    updates, _ = tx.update(grads, tx.init((base, delta)), (base, delta))
  want, _ = clip().update(grads[1], clip().init(delta), delta)
  for u, w in zip(jax.tree.leaves(updates[1]), jax.tree.leaves(want)):
    np.testing.assert_allclose(u, w, rtol=1e-6)
  # the clip bit: the update's norm is the clipping norm
  assert abs(float(optax.global_norm(updates[1])) - 0.01) < 1e-6
  assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates[0]))
  # Clipping outside lj.optimizer clips by a norm that includes the frozen
  # base's gradient (warned about): a smaller update than the delta-only one.
  outer = optax.chain(optax.clip_by_global_norm(0.01),
                      lj.optimizer(optax.sgd(1.0)))
  with pytest.warns(UserWarning, match="frozen base leaves"):
    wrong, _ = outer.update(grads, outer.init((base, delta)), (base, delta))
  full_norm = float(optax.global_norm(grads))
  assert full_norm > float(optax.global_norm(grads[1])) > 0.01
  for u, g in zip(jax.tree.leaves(wrong[1]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(u, -0.01 / full_norm * g, rtol=1e-5)


def test_multisteps_inside_the_optimizer_accumulates_factors_only():
  _, base, delta, fn, x = _mlp()
  tx = lj.optimizer(optax.MultiSteps(optax.adam(0.1), every_k_schedule=2))
  ref = optax.MultiSteps(optax.adam(0.1), every_k_schedule=2)
  state, ref_state = tx.init((base, delta)), ref.init(delta)
  nbytes = lambda t: sum(a.nbytes for a in jax.tree.leaves(t))
  assert nbytes(state) == nbytes(ref_state)  # no full-size accumulator
  pair, d = (base, delta), delta
  for i in range(4):
    grads = _pair_grads(*pair, fn, x + i)
    with pytest.warns(UserWarning) if i == 0 else _no_warning():  # once
      updates, state = tx.update(grads, state, pair)
    pair = optax.apply_updates(pair, updates)
    g = jax.grad(lambda d, i=i: jnp.sum(fn(lj.merge(base, d), x + i) ** 2))(d)
    u, ref_state = ref.update(g, ref_state, d)
    d = optax.apply_updates(d, u)
  for got, want in zip(jax.tree.leaves(pair[1]), jax.tree.leaves(d)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(lj.adapters(d)["fc/kernel"].b,
                         lj.adapters(delta)["fc/kernel"].b)
  np.testing.assert_array_equal(pair[0]["fc"]["kernel"], base["fc"]["kernel"])


@contextlib.contextmanager
def _no_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


# NNX state with an integer RNG counter -------------------------------------

class _DropNet(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.drop(nnx.relu(self.fc1(x))))


def test_nnx_model_with_dropout_rngs_trains_delta_only():
  graph, state = nnx.split(_DropNet(nnx.Rngs(0, dropout=1)))
  assert state["drop"]["rngs"]["count"].value.dtype == jnp.uint32
  fn = lambda s, x: nnx.merge(graph, s)(x)
  x = jax.random.normal(jax.random.key(2), (16, 8))
  y = jnp.sin(x[:, :2])
  base, delta = lj.split(state, lj.LoraConfig(rank=2, targets=".*kernel"),
                         jax.random.key(3), apply_fn=fn, example_args=(x,))
  apply = lj.wrap(fn)
  loss = lambda b, d: jnp.mean((apply(b, d, x) - y) ** 2)
  with pytest.raises(TypeError, match="grad requires real- or complex-valued"):
    jax.grad(lambda bd: loss(*bd))((base, delta))  # JAX's own rule
  # the documented loop: gradients of the delta only
  g = jax.grad(lambda d: loss(base, d))(delta)
  want = jax.grad(lambda d: jnp.mean((fn(lj.merge(base, d), x) - y) ** 2))(
      delta)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  tx = optax.adam(1e-2)
  opt = tx.init(delta)
  step = jax.jit(lambda d, o: _step(tx, loss, base, d, o))
  losses = []
  for _ in range(20):
    delta, opt, value = step(delta, opt)
    losses.append(float(value))
  assert losses[-1] < 0.8 * losses[0]


def _step(tx, loss, base, delta, opt):
  value, g = jax.value_and_grad(lambda d: loss(base, d))(delta)
  u, opt = tx.update(g, opt, delta)
  return optax.apply_updates(delta, u), opt, value


def test_optimizer_freezes_integer_and_key_leaves():
  graph, state = nnx.split(_DropNet(nnx.Rngs(0, dropout=1)))
  base, delta = lj.split(state, lj.LoraConfig(rank=2, targets=".*kernel"),
                         jax.random.key(3),
                         apply_fn=lambda s, x: nnx.merge(graph, s)(x),
                         example_args=(jnp.ones((1, 8)),))
  tx = lj.optimizer(optax.adam(1e-3), trainable=".*")  # all but the Rngs
  float_bytes = sum(x.nbytes for x in jax.tree.leaves((base, delta))
                    if jnp.issubdtype(x.dtype, jnp.floating))
  assert sum(x.nbytes for x in jax.tree.leaves(tx.init((base, delta)))) == (
      2 * float_bytes + 4)
  # pair gradients with allow_int=True: float0 leaves optax cannot apply
  fn = lambda s, x: nnx.merge(graph, s)(x)
  loss = lambda bd: jnp.sum(lj.wrap(fn)(*bd, jnp.ones((1, 8))))
  grads = jax.grad(loss, allow_int=True)((base, delta))
  with pytest.raises(TypeError, match=re.escape(
      "lora_jax.optimizer: the base gradient has float0 leaves at "
      "['drop/rngs/count', 'drop/rngs/key']: integer or key leaves (an NNX "
      "Rngs counter or key) that optax.apply_updates cannot update. "
      "Differentiate the delta only")):
    tx.update(grads, tx.init((base, delta)), (base, delta))


def test_nnx_params_only_pair_trains_like_delta_only():
  model = _DropNet(nnx.Rngs(0, dropout=1))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  fn = lambda p, rest, x: nnx.merge(graph, p, rest)(x)  # Rngs as an argument
  x = jax.random.normal(jax.random.key(2), (4, 8))
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets=".*kernel"),
                         jax.random.key(3), apply_fn=fn,
                         example_args=(rest, x))
  delta = randomize(delta)
  loss = lambda b, d: jnp.sum(lj.wrap(fn)(b, d, rest, x) ** 2)
  tx = lj.optimizer(optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(1.)))
  grads = jax.jit(jax.grad(lambda bd: loss(*bd)))((base, delta))
  updates, _ = jax.jit(tx.update)(grads, tx.init((base, delta)), (base, delta))
  ref = optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(1.))
  g = jax.grad(lambda d: loss(base, d))(delta)
  want, _ = ref.update(g, ref.init(delta), delta)
  for a, b in zip(jax.tree.leaves(updates[1]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert abs(float(optax.global_norm(updates[1])) - 0.1) < 1e-5
