"""Factor shardings from logical axis rules, under Explicit mesh axes.

MaxText- and Flax-style models name their kernels' axes logically
(``nn.with_logical_partitioning`` in Linen, ``sharding`` metadata on NNX
``Param``s) and map the names onto the mesh with rules
(``nn.logical_to_mesh_sharding``). The factors of a dense kernel, an einsum
kernel with a heads axis, a convolution and a scanned stack follow the
kernel's mesh sharding in ``split`` and in ``delta_shardings``, and the
sharded model computes what the unsharded merge does.
"""

import contextlib

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import sharding_helpers as sh

import lora_jax as lj

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices "
                       "(tests/conftest.py sets them before jax starts)")]

RULES = (("batch", "data"), ("embed", None), ("mlp", "model"),
         ("heads", "model"), ("kv", None), ("layers", None), ("conv_h", None), ("conv_w", None))
AXES = {"dense": ("embed", "mlp"), "heads": ("embed", "heads", "kv"),
        "conv": ("conv_h", "conv_w", "embed", "mlp"),
        "stack": ("layers", "embed", "mlp")}
init = nn.initializers.lecun_normal()


class _Block(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    w = self.param("kernel", nn.with_logical_partitioning(init, AXES["stack"][1:]),
                   (8, 8))
    return jnp.tanh(c @ w), None


class _Model(nn.Module):
  # Linen's Conv passes no out_sharding, which a convolution of a sharded
  # kernel needs under Explicit axes: the sharded run leaves it out
  conv: bool = True

  @nn.compact
  def __call__(self, img):  # img (B, H, W, C)
    h = img.mean(axis=(1, 2))
    if self.conv:
      h = nn.Conv(8, (3, 3), use_bias=False, name="conv",
                  kernel_init=nn.with_logical_partitioning(
                      init, AXES["conv"]))(img).mean(axis=(1, 2))
    q = nn.DenseGeneral((4, 2), use_bias=False, name="heads",
                        kernel_init=nn.with_logical_partitioning(
                            init, AXES["heads"]))(h)
    h = nn.Dense(8, use_bias=False, name="dense",
                 kernel_init=nn.with_logical_partitioning(
                     init, AXES["dense"]))(h) * q.reshape(q.shape[0], 8)
    stack = nn.scan(_Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=2,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(name="stack")(h, None)[0]


WANT = {  # kernel spec -> (a, b) under RULES
    "conv/kernel": (P(None, None, None, None), P(None, "model")),
    "heads/kernel": (P(None, None), P(None, "model", None)),
    "dense/kernel": (P(None, None), P(None, "model")),
    "stack/kernel": (P(None, None, None), P(None, None, "model")),
}


def test_linen_logical_rules_under_explicit_axes():
  WANT_RUN = dict(WANT)  # noqa: N806
  model = _Model()
  img = jax.random.normal(jax.random.key(0), (4, 5, 5, 8))
  variables = model.init(jax.random.key(1), img)
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(sh.AxisType.Explicit,) * 2)
  shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(variables), mesh, RULES)["params"]
  params = nn.unbox(variables)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  cfg = lj.LoraConfig(rank=2, targets=".*kernel")
  base, delta = lj.split(params, cfg, jax.random.key(2), apply_fn=fn,
                         example_args=(img,))
  delta = jax.tree.map(
      lambda d: d.replace(b=0.3 * jnp.ones_like(d.b)), delta,
      is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  want = jax.jit(lj.wrap(fn, "merge"))(base, delta, img)
  derived = lj.delta_shardings(delta, shardings)
  got = {p: (d.a.spec, d.b.spec) for p, d in lj.adapters(derived).items()}
  assert got == WANT
  # the sharded split and run, without the convolution
  del shardings["conv"], WANT_RUN["conv/kernel"]
  model = _Model(conv=False)
  base, delta = base.copy(), delta.copy()
  del base["conv"], delta["conv"]
  want = jax.jit(lj.wrap(fn, "merge"))(base, delta, img)
  derived = lj.delta_shardings(delta, shardings)
  with sh.set_mesh(mesh):
    sbase = jax.device_put(base, shardings)
    _, sdelta = lj.split(sbase, cfg, jax.random.key(2), apply_fn=fn,
                         example_args=(img,))
    placed = {p: (d.a.sharding.spec, d.b.sharding.spec)
              for p, d in lj.adapters(sdelta).items()}
    sdelta = jax.device_put(delta, derived)
    simg = jax.device_put(img, NamedSharding(mesh, P("data")))
    outs = {e: jax.jit(lj.wrap(fn, e, strict=True))(sbase, sdelta, simg)
            for e in ("factored", "merge")}
  assert {p: tuple(P(*s) for s in ab) for p, ab in placed.items()} == WANT_RUN
  for out in outs.values():
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


class _Nnx(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, use_bias=False, rngs=rngs,
                         kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
    self.down = nnx.Linear(16, 8, use_bias=False, rngs=rngs,
                           kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

  def __call__(self, x, explicit):
    h = jax.nn.gelu(self.up(x))
    if explicit:  # row-parallel: explicit axes ask for the out_sharding
      return jnp.einsum("bf,fd->bd", h, self.down.kernel[...],
                        out_sharding=P("data", None))
    return self.down(h)


def test_nnx_sharding_metadata_under_explicit_axes():
  # logical names, placed below by the rules (flax >= 0.12 would place them
  # eagerly at creation, on mesh axes of those names)
  lazy = getattr(nnx, "use_eager_sharding", None)
  with lazy(False) if lazy else contextlib.nullcontext():
    graph, state = nnx.split(_Nnx(nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(3), (8, 8))
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(sh.AxisType.Explicit,) * 2)
  # the Params' logical names through the rules, by leaf path
  specs = jax.tree.map(
      lambda s: nn.logical_to_mesh_axes(tuple(s), RULES),
      nnx.to_pure_dict(nnx.get_partition_spec(state)),
      is_leaf=lambda s: isinstance(s, P))
  by_path = dict(lj.leaves_with_paths(specs,
                                      is_leaf=lambda s: isinstance(s, P)))
  fn = lambda explicit: lambda s, x: nnx.merge(graph, s)(x, explicit)
  base, delta = lj.split(state, lj.LoraConfig(rank=2, targets=".*kernel"),
                         jax.random.key(4))
  delta = jax.tree.map(
      lambda d: d.replace(b=0.3 * jnp.ones_like(d.b)), delta,
      is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  want = jax.jit(lj.wrap(fn(False), "merge"))(base, delta, x)
  derived = lj.delta_shardings(delta, specs)
  got = {p: (d.a, d.b) for p, d in lj.adapters(derived).items()}
  assert got == {"up/kernel": (P(None, None), P(None, "model")),
                 "down/kernel": (P("model", None), P(None, None))}
  with sh.set_mesh(mesh):
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), derived,
                         is_leaf=lambda s: isinstance(s, P))
    sbase = lj.map_with_paths(lambda p, v: jax.device_put(
        v, NamedSharding(mesh, by_path[p])), base)
    sdelta = jax.device_put(delta, named)
    sx = jax.device_put(x, NamedSharding(mesh, P("data")))
    outs = [jax.jit(lj.wrap(fn(True), e, strict=True))(sbase, sdelta, sx)
            for e in ("factored", "merge")]
  for out in outs:
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
