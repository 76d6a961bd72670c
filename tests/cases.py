"""Layer cases shared by the tests: one per kernel layout lora_jax supports.

Each case gives params, an apply function ``f(params, *args)``, example args,
the targets regex, and the layout tracing must find for each targeted path.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax as lj

D = lj.Layout.dense()


@dataclasses.dataclass
class Case:
  name: str
  params: Any
  fn: Callable
  args: tuple
  targets: Any
  layouts: dict  # path -> expected Layout
  kind: str = "linen"  # linen | nnx | plain

  def split(self, rank=2, key=1, **kw):
    cfg = lj.LoraConfig(rank=rank, alpha=3.0, targets=self.targets, **kw)
    return lj.split(self.params, cfg, jax.random.key(key), apply_fn=self.fn,
                    example_args=self.args)


def _x(*shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def linen(name, module, *args, targets=r".*kernel", layouts, method=None):
  params = module.init(jax.random.key(0), *args, method=method)["params"]
  fn = lambda p, *a: module.apply({"params": p}, *a, method=method)
  return Case(name, params, fn, args, targets, layouts)


class _Tied(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 8)
    return emb.attend(nn.Dense(8)(emb(ids)))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return nn.tanh(nn.Dense(8)(c)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(nn.remat(_Block), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    return stack()(x, None)[0]


class _Transposed(nn.Module):
  """GPT-2 style: kernel stored (out, in), used as x @ W.T."""
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.2), (6, 8))
    return x @ w.T


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


class _NnxLayer(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return nnx.tanh(self.lin(x))


def _nnx_stack():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return _NnxLayer(nnx.Rngs(key))
  return make(jax.random.split(jax.random.key(0), 3))


def nnx_cases():
  graph, state = nnx.split(_NnxMLP(nnx.Rngs(0)))
  mlp = Case("nnx_linear", state, lambda s, x: nnx.merge(graph, s)(x),
             (_x(4, 8),), r".*kernel", {"fc1/kernel": D, "fc2/kernel": D},
             kind="nnx")
  sgraph, sstate = nnx.split(_nnx_stack())

  def scan_fn(s, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, c):
      return layer(c)
    return body(nnx.merge(sgraph, s), x)

  def vmap_fn(s, x):
    @nnx.vmap(in_axes=(0, 0))
    def body(layer, c):
      return layer(c)
    return body(nnx.merge(sgraph, s), x)
  stacked = lj.Layout((0,), (1,), (2,))
  return [
      mlp,
      Case("nnx_scan", sstate, scan_fn, (_x(4, 8),), r".*kernel",
           {"lin/kernel": stacked}, kind="nnx"),
      Case("nnx_vmap", sstate, vmap_fn, (_x(3, 4, 8),), r".*kernel",
           {"lin/kernel": stacked}, kind="nnx"),
  ]


def plain_case():
  k = jax.random.split(jax.random.key(3), 3)
  params = {"w1": jax.random.normal(k[0], (8, 16)) * 0.3,
            "w2": jax.random.normal(k[1], (4, 16)) * 0.3,   # stored (out, in)
            "b": jnp.zeros(16)}

  def fn(p, x):
    h = jax.nn.gelu(jnp.einsum("bi,io->bo", x, p["w1"]) + p["b"])
    return jnp.dot(h, p["w2"].T)
  return Case("plain", params, fn, (_x(4, 8),), r"w\d", {
      "w1": D, "w2": lj.Layout.transposed()}, kind="plain")


def all_cases() -> list[Case]:
  x3 = _x(2, 5, 8)
  ids = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  head = lj.Layout((), (0,), (1, 2))
  cases = [
      linen("dense", nn.Dense(6), x3, layouts={"kernel": D}),
      linen("dense_general", nn.DenseGeneral((2, 3)), x3,
            layouts={"kernel": head}),
      linen("dense_general_in2", nn.DenseGeneral(5, axis=(-2, -1)),
            _x(2, 4, 3), layouts={"kernel": lj.Layout((), (0, 1), (2,))}),
      linen("attention", nn.MultiHeadDotProductAttention(num_heads=2,
                                                         qkv_features=8), x3,
            layouts={"query/kernel": head, "key/kernel": head,
                     "value/kernel": head,
                     "out/kernel": lj.Layout((), (0, 1), (2,))}),
      linen("einsum", nn.Einsum((8, 2, 3), "btd,dhk->bthk"), x3,
            layouts={"kernel": head}),
      linen("conv1d", nn.Conv(6, (3,)), x3,
            layouts={"kernel": lj.Layout((), (0, 1), (2,))}),
      linen("conv2d", nn.Conv(6, (3, 3)), _x(2, 5, 5, 4),
            layouts={"kernel": lj.Layout((), (0, 1, 2), (3,))}),
      linen("embed", nn.Embed(11, 8), ids, targets=r"embedding",
            layouts={"embedding": D}),
      linen("embed_attend", nn.Embed(11, 8), x3, targets=r"embedding",
            method="attend", layouts={"embedding": lj.Layout.transposed()}),
      linen("tied_embedding", _Tied(), ids, targets=r".*(embedding|kernel)",
            layouts={"Embed_0/embedding": D, "Dense_0/kernel": D}),
      linen("scan_remat", _Scanned(), x3,
            layouts={"ScanCheckpoint_Block_0/Dense_0/kernel":
                     lj.Layout((0,), (1,), (2,))}),
      linen("transposed", _Transposed(), x3, targets=r"w",
            layouts={"w": lj.Layout.transposed()}),
  ]
  return cases + nnx_cases() + [plain_case()]


CASES = {c.name: c for c in all_cases()}
