"""Small models written the way JAX LLM libraries write theirs.

* ``NnxDecoder``: an NNX decoder in the style of tunix / Gemma's NNX port:
  attention projections are einsum parameters named ``w`` of shapes
  ``(embed, heads, head_dim)`` and ``(heads, head_dim, embed)``, with grouped
  KV heads, a gated MLP of einsums, RMSNorm, a token embedding and an LM head
  that is also an einsum ``w``.
* ``GemmaAttention``: Linen, Gemma's q / kv einsum pair: q ``(heads, embed,
  head_dim)`` and kv ``(2, kv_heads, embed, head_dim)`` in one einsum.
* ``MoeLayer``: NNX, a Qwen3-MoE-style layer: a router and 4 experts with
  gated MLPs stacked ``(E, in, out)``, top-2 routing, computed either as a
  per-expert loop of slices or with ``jax.lax.ragged_dot`` (grouped matmul).

Each ``*_case()`` returns ``(params, fn, args, expected all-linear paths)``.
"""

from __future__ import annotations

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp


def _init(rngs, shape, scale=0.2):
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape))


class Einsum(nnx.Module):
  def __init__(self, shape, rngs):
    self.w = _init(rngs, shape)

  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.w[...])


class Attention(nnx.Module):
  def __init__(self, d, heads, kv_heads, head_dim, rngs):
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
    self.q = Einsum((d, heads, head_dim), rngs)
    self.k = Einsum((d, kv_heads, head_dim), rngs)
    self.v = Einsum((d, kv_heads, head_dim), rngs)
    self.o = Einsum((heads, head_dim, d), rngs)

  def __call__(self, x):
    q = self.q("btd,dnh->btnh", x)
    k = self.k("btd,dkh->btkh", x)
    v = self.v("btd,dkh->btkh", x)
    groups = self.heads // self.kv_heads
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(self.head_dim)
    t = x.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)
    return self.o("btnh,nhd->btd", o)


class GatedMLP(nnx.Module):
  def __init__(self, d, f, rngs):
    self.gate = Einsum((d, f), rngs)
    self.up = Einsum((d, f), rngs)
    self.down = Einsum((f, d), rngs)

  def __call__(self, x):
    h = jax.nn.gelu(self.gate("btd,df->btf", x)) * self.up("btd,df->btf", x)
    return self.down("btf,fd->btd", h)


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.norm1 = nnx.RMSNorm(d, rngs=rngs)
    self.attn = Attention(d, heads=4, kv_heads=2, head_dim=4, rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, rngs=rngs)
    self.mlp = GatedMLP(d, 2 * d, rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class NnxDecoder(nnx.Module):
  def __init__(self, vocab=19, d=16, layers=2, rngs=None):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, rngs) for _ in range(layers)]) if hasattr(
        nnx, "List") else [Block(d, rngs) for _ in range(layers)]
    self.norm = nnx.RMSNorm(d, rngs=rngs)
    self.head = Einsum((d, vocab), rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head("btd,dv->btv", self.norm(x))


def nnx_decoder_case():
  model = NnxDecoder(rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)
  ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 19)
  fn = lambda s, ids: nnx.merge(graph, s)(ids)
  expected = {f"blocks/{i}/{m}/w" for i in range(2)
              for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate",
                        "mlp/up", "mlp/down")}
  return state, fn, (ids,), expected


class GemmaAttention(nn.Module):
  """Gemma's attention projections: q (N, D, H), kv (2, K, D, H), out
  (N, H, D)."""
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 4

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.normal(0.2)
    q_w = self.param("q_einsum", init, (self.heads, d, self.head_dim))
    kv_w = self.param("kv_einsum", init, (2, self.kv_heads, d, self.head_dim))
    out_w = self.param("attn_vec_einsum", init,
                       (self.heads, self.head_dim, d))
    q = jnp.einsum("BTD,NDH->BTNH", x, q_w)
    k, v = jnp.einsum("BSD,CKDH->CBSKH", x, kv_w)
    groups = self.heads // self.kv_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    p = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / 2.0, axis=-1)
    o = jnp.einsum("BNTS,BSNH->BTNH", p, v)
    y = jnp.einsum("BTNH,NHD->BTD", o, out_w)
    return nn.Dense(3, name="classifier")(y.mean(axis=1))


def gemma_case():
  model = GemmaAttention()
  x = jax.random.normal(jax.random.key(2), (2, 5, 16))
  params = model.init(jax.random.key(0), x)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  # the classifier is the output layer: all-linear leaves it alone
  return params, fn, (x,), {"q_einsum", "kv_einsum", "attn_vec_einsum"}


class MoeLayer(nnx.Module):
  """Top-2 routing over 4 experts, each a gated MLP, then a dense out."""

  def __init__(self, d=8, f=12, experts=4, ragged=False, rngs=None):
    self.ragged, self.experts = ragged, experts
    self.router = Einsum((d, experts), rngs)
    self.gate_proj = _init(rngs, (experts, d, f))
    self.up_proj = _init(rngs, (experts, d, f))
    self.down_proj = _init(rngs, (experts, f, d))
    self.out = Einsum((d, 3), rngs)

  def __call__(self, x):  # x (tokens, d)
    probs = jax.nn.softmax(self.router("td,de->te", x), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, 2)
    top_w = top_w / top_w.sum(-1, keepdims=True)
    y = self._ragged(x, top_w, top_i) if self.ragged else self._loop(
        x, top_w, top_i)
    return self.out("td,do->to", jnp.tanh(y))

  def _expert(self, x, g, u, d):
    return (jax.nn.silu(x @ g) * (x @ u)) @ d

  def _loop(self, x, top_w, top_i):
    y = jnp.zeros_like(x)
    for e in range(self.experts):
      weight = jnp.sum(jnp.where(top_i == e, top_w, 0.0), axis=-1)
      ye = self._expert(x, self.gate_proj[e], self.up_proj[e],
                        self.down_proj[e])
      y = y + weight[:, None] * ye
    return y

  def _ragged(self, x, top_w, top_i):
    t, k = top_i.shape
    flat_e = top_i.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    token = order // k
    xs = x[token]
    sizes = jnp.bincount(flat_e, length=self.experts).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, self.gate_proj[...], sizes)) * (
        jax.lax.ragged_dot(xs, self.up_proj[...], sizes))
    ys = jax.lax.ragged_dot(h, self.down_proj[...], sizes)
    ys = ys * top_w.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(ys)


def moe_case(ragged: bool):
  model = MoeLayer(ragged=ragged, rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(3), (10, 8))
  fn = lambda s, x: nnx.merge(graph, s)(x)
  # the router's weights scale the experts' outputs, which reach the out
  # matmul: it is a hidden layer, as in PEFT's all-linear; `out` is the head
  return state, fn, (x,), {"router/w", "gate_proj", "up_proj", "down_proj"}
