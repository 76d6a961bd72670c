"""``lj.wrap`` under JAX's transformations and with the inputs users bring:
a bf16 base with DoRA, forward-mode AD, ``jit`` with static and donated
arguments, sharding annotations, and LoRA dropout under ``vmap``."""

import inspect

import flax.linen as nn
from helpers import randomize
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import lora_jax as lj

MODES = ("auto", "factored", "merge")


def _dense_case(dtype, param_dtype, base_dtype=None):
  model = nn.Dense(8, dtype=dtype, param_dtype=param_dtype)
  x = jax.random.normal(jax.random.key(0), (4, 6))
  params = model.init(jax.random.key(1), x)["params"]
  if base_dtype is not None:
    params = jax.tree.map(lambda p: p.astype(base_dtype), params)
  fn = lambda p, x: model.apply({"params": p}, x).astype(jnp.float32)
  cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="kernel", dora=True)
  base, delta = lj.split(params, cfg, jax.random.key(2))
  delta = randomize(delta, scale=0.5)
  delta = jax.tree.map(lambda d: d.replace(magnitude=d.magnitude * 1.7)
                       if isinstance(d, lj.LoraDelta) else d, delta,
                       is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  return fn, base, delta, x


@pytest.mark.parametrize("setup", ["bf16_base", "bf16_compute"])
def test_dora_survives_a_cast_kernel_in_every_mode(setup):
  """The factored engine once dropped DoRA's magnitude at the cast (off by
  ~4 and a zero magnitude gradient)."""
  fn, base, delta, x = (_dense_case(jnp.float32, jnp.float32, jnp.bfloat16)
                        if setup == "bf16_base"
                        else _dense_case(jnp.bfloat16, jnp.float32))
  loss = lambda mode: lambda d: jnp.sum(lj.wrap(fn, mode)(base, d, x) ** 2)
  want = lj.wrap(fn, "merge")(base, delta, x)
  g_want = jax.grad(loss("merge"))(delta)["kernel"].magnitude
  assert float(jnp.abs(g_want).min()) > 0
  for mode in ("auto", "factored"):
    got = lj.wrap(fn, mode, strict=True)(base, delta, x)
    # bf16 rounding of W0 + s a b (merge) vs a float32 branch (factored)
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)
    g = jax.grad(loss(mode))(delta)["kernel"].magnitude
    np.testing.assert_allclose(g, g_want, rtol=5e-2, atol=5e-2)
  # and without DoRA's factor the output is far off: the check has teeth
  plain = jax.tree.map(lambda d: d.replace(magnitude=None)
                       if isinstance(d, lj.LoraDelta) else d, delta,
                       is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  assert float(jnp.abs(lj.wrap(fn, "merge")(base, plain, x) - want).max()) > 0.5


def _mlp_case():
  model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (5, 6))
  params = model.init(jax.random.key(1), x)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(2))
  return fn, base, randomize(delta), x


@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_jvp_and_jacfwd_equal_merge(mode):
  fn, base, delta, x = _mlp_case()
  f = lambda d: lj.wrap(fn, mode)(base, d, x)
  ref = lambda d: lj.wrap(fn, "merge")(base, d, x)
  tangent = jax.tree.map(lambda v: 0.1 * jnp.ones_like(v), delta)
  (y, t), (y_m, t_m) = jax.jvp(f, (delta,), (tangent,)), jax.jvp(
      ref, (delta,), (tangent,))
  np.testing.assert_allclose(y, y_m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t, t_m, rtol=1e-5, atol=1e-6)
  jf, jm = jax.jacfwd(f)(delta), jax.jacrev(ref)(delta)
  for a, b in zip(jax.tree.leaves(jf), jax.tree.leaves(jm)):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b).max()))
  # jvp w.r.t. the input as well (linearize through the factored branch)
  _, tx = jax.jvp(lambda x: lj.wrap(fn, mode)(base, delta, x), (x,),
                  (jnp.ones_like(x),))
  _, tx_m = jax.jvp(lambda x: ref_x(fn, base, delta, x), (x,),
                    (jnp.ones_like(x),))
  np.testing.assert_allclose(tx, tx_m, rtol=1e-5, atol=1e-6)


def ref_x(fn, base, delta, x):
  return lj.wrap(fn, "merge")(base, delta, x)


class _WithDropout(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic):
    h = nn.Dropout(0.5)(nn.Dense(8)(x), deterministic=deterministic)
    return nn.Dense(3)(h)


def _dropout_case():
  """A model with a Python ``deterministic`` flag: (fn, params, base, delta, x)."""
  model = _WithDropout()
  x = jnp.ones((2, 6))
  params = model.init(jax.random.key(0), x, True)["params"]
  fn = lambda p, x, deterministic: model.apply({"params": p}, x,
                                               deterministic=deterministic)
  base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(1))
  return fn, params, base, delta, x


@pytest.mark.parametrize("mode", MODES)
def test_jit_static_argnames_and_donation(mode):
  fn, params, base, delta, x = _dropout_case()
  delta = randomize(delta)
  wrapped = lj.wrap(fn, mode)
  assert list(inspect.signature(wrapped).parameters) == [
      "base", "delta", "args", "lora_rng", "adapter_ids", "kwargs"]
  jitted = jax.jit(wrapped, static_argnames="deterministic")
  want = fn(lj.merge(base, delta), x, deterministic=True)
  np.testing.assert_allclose(jitted(base, delta, x, deterministic=True), want,
                             rtol=1e-5)
  # donation of the delta: the step returns new factors, the old buffers go
  step = jax.jit(lambda base, delta, x: jax.tree.map(
      lambda d: d * 0.5, jax.grad(lambda d: jnp.sum(wrapped(
          base, d, x, deterministic=True)))(delta)), donate_argnames="delta")
  donated = jax.tree.map(jnp.copy, delta)
  out = step(base, donated, x)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated))
  g = jax.grad(lambda d: jnp.sum(fn(lj.merge(base, d), x, True)))(delta)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, 0.5 * b, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(b).max()))
  # explain takes the same arguments and keywords
  if mode != "merge":
    report = lj.explain(fn, base, delta, x, mode=mode, deterministic=True)
    assert report.fallbacks == {}


def _auto(n):
  """Auto axis types: lora_jax does not support Explicit-axis meshes yet."""
  if hasattr(jax.sharding, "AxisType"):
    return {"axis_types": (jax.sharding.AxisType.Auto,) * n}
  return {}


def test_logically_partitioned_params_are_views():
  """Flax's logical partitioning constrains each kernel's sharding at use:
  a view, not a reason to merge."""
  mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4],
                       **_auto(2))
  rules = (("embed", "data"), ("mlp", "model"))

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.normal(0.3),
                                          ("embed", "mlp"))
      h = nn.Dense(8, kernel_init=init)(x)
      return nn.Dense(4, kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(0.3), ("mlp", "embed")))(jnp.tanh(h))
  m = M()
  x = jax.random.normal(jax.random.key(0), (4, 4))
  # jax.set_mesh (jax >= 0.7) is what makes Flax emit the constraints
  in_mesh = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
  with in_mesh, nn.logical_axis_rules(rules):
    params = m.init(jax.random.key(1), x)["params"]  # boxed: constrained at use
    fn = lambda p, x: m.apply({"params": p}, x)
    base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(2))
    delta = randomize(delta)
    text = str(jax.make_jaxpr(fn)(params, x))
    assert ("sharding_constraint" in text) == hasattr(jax, "set_mesh")
    got = jax.jit(lj.wrap(fn, "factored", strict=True))(base, delta, x)
    report = lj.explain(fn, base, delta, x, mode="factored")
  assert report.fallbacks == {}
  np.testing.assert_allclose(got, fn(lj.merge(base, delta), x), rtol=1e-5,
                             atol=1e-6)


def test_shard_map_with_sharded_kernel_is_factored():
  mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2],
                       **_auto(1))
  w = jax.random.normal(jax.random.key(0), (6, 4)) * 0.3
  sm = getattr(jax, "shard_map", None)
  if sm is None:
    from jax.experimental.shard_map import shard_map as sm

  def fn(p, x):  # a column-parallel matmul: the kernel split over "model"
    return sm(lambda w, x: x @ w, mesh=mesh, in_specs=(P(None, "model"), P()),
              out_specs=P(None, "model"))(p["w"], x)
  params = {"w": jax.device_put(w, NamedSharding(mesh, P(None, "model")))}
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="w"),
                         jax.random.key(1))
  # factors placed like the kernel (as split does), also on an explicit mesh
  delta = jax.device_put(randomize(delta), lj.delta_shardings(
      delta, {"w": params["w"].sharding}))
  x = jax.random.normal(jax.random.key(2), (3, 6))
  got = lj.wrap(fn, "factored", strict=True)(base, delta, x)
  np.testing.assert_allclose(got, x @ lj.merge(base, delta)["w"], rtol=1e-5,
                             atol=1e-6)
  g = jax.grad(lambda d: jnp.sum(jnp.sin(lj.wrap(fn, "factored", strict=True)(
      base, d, x))))(delta)
  g_m = jax.grad(lambda d: jnp.sum(jnp.sin(x @ lj.merge(base, d)["w"])))(delta)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_m)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_under_vmap_follows_the_key():
  """Like every JAX random function, the same key gives the same mask: under
  ``vmap`` with one shared key every example gets the same mask; pass one key
  per example (``jax.random.split``) for independent masks, as documented in
  ``lj.wrap``."""
  params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
  fn = lambda p, x: x @ p["w"]
  cfg = lj.LoraConfig(rank=4, targets="w", dropout=0.5)
  base, delta = lj.split(params, cfg, jax.random.key(1))
  delta = randomize(delta)
  x = jnp.ones((6, 16))  # six identical examples
  apply = lj.wrap(fn)
  key = jax.random.key(3)
  shared = jax.vmap(lambda x: apply(base, delta, x, lora_rng=key))(x)
  per_example = jax.vmap(lambda x, k: apply(base, delta, x, lora_rng=k))(
      x, jax.random.split(key, 6))
  assert float(jnp.abs(shared - shared[0]).max()) == 0.0
  rows = {tuple(np.round(np.asarray(r), 5)) for r in per_example}
  assert len(rows) == 6


def test_wrap_places_a_plainly_loaded_delta_like_a_sharded_base(tmp_path):
  """README's pattern, eagerly: a base on a mesh, an adapter loaded without
  shardings (on one device). The factors follow their kernels."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), **_auto(2))
  params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
  fn = lambda p, x: jnp.tanh(x @ p["w"])
  cfg = lj.LoraConfig(rank=2, targets="w")
  _, delta = lj.split(params, cfg, jax.random.key(1))
  path = lj.save(tmp_path / "a", randomize(delta), cfg)
  base = {"w": jax.device_put(params["w"], NamedSharding(mesh, P("data", "model")))}
  loaded = lj.load(path)
  x = jnp.ones((2, 8))
  want = fn(lj.merge(params, loaded), x)  # unsharded reference
  for mode in MODES:
    np.testing.assert_allclose(lj.wrap(fn, mode)(base, loaded, x), want,
                               rtol=1e-5, atol=1e-6)


def test_explain_takes_abstract_arguments_and_python_flags():
  """explain traces arrays and ShapeDtypeStructs and keeps Python flags."""
  fn, _, base, delta, _ = _dropout_case()
  report = lj.explain(fn, base, delta, jax.ShapeDtypeStruct((4, 6), jnp.float32),
                      deterministic=True)
  assert report.rules == {"Dense_0/kernel": ["dot_general"],
                          "Dense_1/kernel": ["dot_general"]}
