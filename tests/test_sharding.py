"""LoRA on a (4, 2) device mesh of simulated CPU devices (see conftest.py)."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import lora_jax as lj

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets "
    "--xla_force_host_platform_device_count=8 before jax starts)")

SPECS = {"w1": P("data", "model"), "w2": P("model", "data"),
         "w3": P(None, "model"), "stack": P(None, "data", "model")}


def _mesh():
  auto = jax.sharding.AxisType.Auto  # GSPMD propagation, as pjit always had
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))


def _placed(x, mesh, spec) -> bool:
  return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def _model():
  k = jax.random.split(jax.random.key(0), 5)
  params = {"w1": jax.random.normal(k[0], (16, 32)) * 0.2,
            "w2": jax.random.normal(k[1], (32, 16)) * 0.2,
            "w3": jax.random.normal(k[2], (16, 8)) * 0.2,
            "stack": jax.random.normal(k[3], (3, 16, 16)) * 0.2}

  def fn(p, x):
    h = jax.nn.gelu(x @ p["w1"])
    h = jax.nn.gelu(h @ p["w2"])
    h = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])[0]
    return h @ p["w3"]
  x = jax.random.normal(k[4], (32, 16))
  return params, fn, x


def _split(params, fn, x):
  cfg = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w\d|stack")
  return lj.split(params, cfg, jax.random.key(1), apply_fn=fn, example_args=(x,))


def _shard(params, mesh):
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
          for k, v in params.items()}


def test_factor_specs_follow_the_kernel():
  mesh = _mesh()
  params, fn, x = _model()
  base, delta = _split(_shard(params, mesh), fn, x)
  got = {p: (d.a.sharding.spec, d.b.sharding.spec)
         for p, d in lj.adapters(delta).items()}
  assert got == {
      "w1": (P("data", None), P(None, "model")),
      "w2": (P("model", None), P(None, "data")),
      "w3": (P(None, None), P(None, "model")),
      "stack": (P(None, "data", None), P(None, None, "model")),
  }
  # the same derivation from specs alone, on an abstract delta
  abstract = jax.eval_shape(lambda p: _split(p, fn, x)[1], params)
  from_specs = lj.delta_shardings(abstract, SPECS)
  assert {p: (d.a, d.b) for p, d in lj.adapters(from_specs).items()} == got
  # and it initialises a delta straight onto the mesh
  shardings = lj.delta_shardings(abstract, jax.tree.map(
      lambda s: NamedSharding(mesh, s), SPECS))
  init = jax.jit(lambda p: _split(p, fn, x)[1], out_shardings=shardings)(params)
  assert lj.adapters(init)["stack"].b.sharding.spec == P(None, None, "model")


@pytest.mark.parametrize("mode", ["merge", "factored"])
def test_sharded_training_equals_unsharded(mode):
  mesh = _mesh()
  params, fn, x = _model()
  y = jnp.sin(x[:, :8])
  tx = optax.adam(1e-2)

  def train(base, delta, x, y, shardings=None):
    apply = lj.wrap(fn, mode)

    @jax.jit
    def step(delta, opt, base, x, y):
      loss, g = jax.value_and_grad(
          lambda d: jnp.mean((apply(base, d, x) - y) ** 2))(delta)
      u, opt = tx.update(g, opt, delta)
      delta = optax.apply_updates(delta, u)
      if shardings is not None:  # keep the factors where split put them
        delta = jax.lax.with_sharding_constraint(delta, shardings)
      return delta, opt, loss
    opt, losses = tx.init(delta), []
    for _ in range(4):
      delta, opt, loss = step(delta, opt, base, x, y)
      losses.append(float(loss))
    return delta, losses, step

  base, delta = _split(params, fn, x)
  _, want, _ = train(base, delta, x, y)
  sbase, sdelta = _split(_shard(params, mesh), fn, x)
  data = NamedSharding(mesh, P("data"))
  sx, sy = jax.device_put(x, data), jax.device_put(y, data)
  shardings = lj.delta_shardings(sdelta, jax.tree.map(lambda v: v.sharding, sbase))
  trained, got, step = train(sbase, sdelta, sx, sy, shardings)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert want[-1] < want[0]
  # factors keep their placement through the step
  for p, d in lj.adapters(sdelta).items():
    assert _placed(lj.adapters(trained)[p].a, mesh, d.a.sharding.spec), p
    assert _placed(lj.adapters(trained)[p].b, mesh, d.b.sharding.spec), p
  # merged kernels keep the base kernels' specs, eagerly and under jit
  for merged in (lj.merge(sbase, trained), jax.jit(lj.merge)(sbase, trained)):
    assert all(_placed(merged[k], mesh, SPECS[k]) for k in SPECS)
  # Collectives: the LoRA step moves no more data between devices than the
  # frozen model's own forward + backward (its FSDP all-gathers of the base
  # kernels), up to factor-sized extras: the base is not resharded for LoRA.
  def collective_elements(fn, *args):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    shapes = re.findall(r"= \w+\[([\d,]*)\][^ ]* (?:all-gather|all-reduce|"
                        r"reduce-scatter|all-to-all|collective-permute)\(", hlo)
    return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)

  def frozen(base, x, y):
    loss, gx = jax.value_and_grad(lambda x: jnp.mean((fn(base, x) - y) ** 2))(x)
    return loss, gx
  lora_step = lambda d, o, b, x, y: step(d, o, b, x, y)
  moved = collective_elements(lora_step, trained, tx.init(trained), sbase, sx, sy)
  floor = collective_elements(frozen, sbase, sx, sy)
  # XLA before jax 0.7.2 (jax 0.6.2, the oldest we support) partitions the
  # merge engine's and the factor products less well: measured 1.6-2.8x the
  # frozen model's collectives there (0.7.0 and 0.7.1 too), 1.0-1.2x from
  # 0.7.2 on.
  old_xla = tuple(int(v) for v in jax.__version__.split(".")[:3]) < (0, 7, 2)
  assert floor > 0 and moved <= (3.0 if old_xla else 1.25) * floor, (
      moved, floor)


def test_sharded_checkpoint_restores_onto_the_mesh(tmp_path):
  mesh = _mesh()
  params, fn, x = _model()
  base, delta = _split(_shard(params, mesh), fn, x)
  path = lj.save(tmp_path / "adapter", delta)
  shardings = lj.delta_shardings(delta, jax.tree.map(lambda v: v.sharding, base))
  loaded = lj.load(path, shardings=shardings)
  for p, d in lj.adapters(delta).items():
    got = lj.adapters(loaded)[p]
    assert got.a.sharding == d.a.sharding and got.b.sharding == d.b.sharding
    np.testing.assert_array_equal(np.asarray(got.a), np.asarray(d.a))
  with pytest.raises(lj.CheckpointError, match="shardings given for"):
    lj.load(path, shardings={"nope": lj.adapters(shardings)["w1"]})
