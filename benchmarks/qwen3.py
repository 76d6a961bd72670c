"""A small Qwen3 decoder in Flax NNX, shaped like google/tunix's Qwen3.

Follows ``tunix/models/qwen3/model.py`` (names, parameter shapes, einsum
strings) without depending on tunix: an ``Embedder`` with an
``input_embedding`` table, decoder layers (``input_layernorm``, attention with
``q_proj`` (embed, heads, head_dim), ``k_proj`` / ``v_proj`` (embed, kv_heads,
head_dim), ``o_proj`` (heads, head_dim, embed) as einsum weights ``w``,
per-head ``q_norm`` / ``k_norm`` RMSNorms, RoPE, grouped-query attention with
a causal mask, ``post_attention_layernorm``, a SwiGLU MLP of bias-free
``nnx.Linear`` ``gate_proj`` / ``up_proj`` / ``down_proj``), ``final_norm``
and an untied ``lm_head`` einsum. Layers are a Python list (unscanned). No KV
cache, no sharding annotations, no flash attention: full-sequence forward
only, as a benchmark needs.

    params, apply = build(jax.random.key(0))
    logits = apply(params, tokens)          # tokens (B, T) int -> (B, T, V)

``params`` is a plain nested dict of arrays (``State.to_pure_dict()``), its
leaves named like ``layers/0/attn/q_proj/w`` and ``layers/0/mlp/gate_proj/
kernel``; :data:`TARGETS` matches the seven projections of every layer.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

K_MASK = -2.3819763e38  # tunix's attention mask value

# q, k, v, o (einsum weights) and gate, up, down (Linear kernels)
TARGETS = (r"layers/\d+/attn/(q_proj|k_proj|v_proj|o_proj)/w"
           r"|layers/\d+/mlp/(gate_proj|up_proj|down_proj)/kernel")

_List = getattr(nnx, "List", list)  # nnx.List from flax 0.12; a list before


@dataclasses.dataclass(frozen=True)
class Config:
  num_layers: int = 4
  vocab_size: int = 2048
  embed_dim: int = 256
  hidden_dim: int = 1024
  num_heads: int = 8
  head_dim: int = 32
  num_kv_heads: int = 4
  rope_theta: int = 1_000_000
  norm_eps: float = 1e-6


TINY = Config(num_layers=2, vocab_size=256, embed_dim=64, hidden_dim=128,
              num_heads=4, head_dim=16, num_kv_heads=2)


class Einsum(nnx.Module):
  def __init__(self, einsum_str, shape, *, rngs, dtype):
    self.einsum_str = einsum_str
    self.shape = tuple(shape)
    self.dtype = dtype
    self.w = nnx.Param(nnx.initializers.glorot_uniform()(
        rngs.params(), shape, dtype=dtype))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x.astype(self.dtype),
                      self.w[...].astype(self.dtype))


class Embedder(nnx.Module):
  def __init__(self, vocab_size, embed_dim, *, rngs, dtype):
    self.input_embedding = nnx.Param(nnx.initializers.normal(dtype=dtype)(
        rngs.params(), (vocab_size, embed_dim)))
    self.dtype = dtype

  def encode(self, x):
    return self.input_embedding[...][(x,)].astype(self.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim, *, norm_eps, rngs, dtype):
    del rngs
    self.w = nnx.Param(jnp.ones((dim,), dtype))
    self.norm_eps = norm_eps
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + self.norm_eps)
    return (self.w[...].astype(jnp.float32) * (x / rms)).astype(self.dtype)


def apply_rope(inputs, positions, head_dim, rope_theta):
  """RoPE on ``inputs`` (B, T, N, H) at ``positions`` (B, T), half-split as
  in tunix."""
  fraction = 2 * jnp.arange(0, head_dim // 2, dtype=jnp.float32) / head_dim
  timescale = rope_theta ** fraction
  sinusoid = positions[..., None] / timescale[None, None, :]
  sinusoid = sinusoid[..., None, :]
  sin = jnp.sin(sinusoid).astype(inputs.dtype)
  cos = jnp.cos(sinusoid).astype(inputs.dtype)
  first, second = jnp.split(inputs, 2, axis=-1)
  out = jnp.concatenate([first * cos - second * sin,
                         second * cos + first * sin], axis=-1)
  return out.astype(inputs.dtype)


class Attention(nnx.Module):
  def __init__(self, c: Config, *, rngs, dtype):
    self.c = c
    self.q_proj = Einsum("BTD,DNH->BTNH",
                         (c.embed_dim, c.num_heads, c.head_dim),
                         rngs=rngs, dtype=dtype)
    self.k_proj = Einsum("BSD,DKH->BSKH",
                         (c.embed_dim, c.num_kv_heads, c.head_dim),
                         rngs=rngs, dtype=dtype)
    self.v_proj = Einsum("BSD,DKH->BSKH",
                         (c.embed_dim, c.num_kv_heads, c.head_dim),
                         rngs=rngs, dtype=dtype)
    self.o_proj = Einsum("BTNH,NHD->BTD",
                         (c.num_heads, c.head_dim, c.embed_dim),
                         rngs=rngs, dtype=dtype)
    self.q_norm = RMSNorm(c.head_dim, norm_eps=c.norm_eps, rngs=rngs,
                          dtype=dtype)
    self.k_norm = RMSNorm(c.head_dim, norm_eps=c.norm_eps, rngs=rngs,
                          dtype=dtype)
    self.scale = c.head_dim ** -0.5

  def __call__(self, x, positions, attn_mask):
    c = self.c
    q = self.q_norm(self.q_proj(x))
    k = self.k_norm(self.k_proj(x))
    v = self.v_proj(x)
    q = apply_rope(q, positions, c.head_dim, c.rope_theta)
    k = apply_rope(k, positions, c.head_dim, c.rope_theta)
    b, t, qh, d = q.shape
    kh = k.shape[2]
    # grouped-query attention: each kv head serves qh // kh query heads
    q = q.reshape((b, t, kh, qh // kh, d))
    attn = jnp.einsum("BTHGD,BSHD->BHGTS", q, k) * self.scale
    attn = jnp.where(attn_mask[:, None, None, :, :], attn, K_MASK)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(k.dtype)
    out = jnp.einsum("BHGTS,BSHD->BTHGD", attn, v).reshape((b, t, qh, d))
    return self.o_proj(out)


class MLP(nnx.Module):
  def __init__(self, c: Config, *, rngs, dtype):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs,
                                     dtype=dtype, param_dtype=dtype)
    self.gate_proj = linear(c.embed_dim, c.hidden_dim)
    self.up_proj = linear(c.embed_dim, c.hidden_dim)
    self.down_proj = linear(c.hidden_dim, c.embed_dim)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, c: Config, *, rngs, dtype):
    norm = lambda: RMSNorm(c.embed_dim, norm_eps=c.norm_eps, rngs=rngs,
                           dtype=dtype)
    self.input_layernorm = norm()
    self.attn = Attention(c, rngs=rngs, dtype=dtype)
    self.post_attention_layernorm = norm()
    self.mlp = MLP(c, rngs=rngs, dtype=dtype)

  def __call__(self, x, positions, attn_mask):
    x = x + self.attn(self.input_layernorm(x), positions, attn_mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nnx.Module):
  def __init__(self, c: Config, *, rngs, dtype=jnp.float32):
    self.c = c
    self.embedder = Embedder(c.vocab_size, c.embed_dim, rngs=rngs, dtype=dtype)
    self.layers = _List([DecoderLayer(c, rngs=rngs, dtype=dtype)
                         for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c.embed_dim, norm_eps=c.norm_eps, rngs=rngs,
                              dtype=dtype)
    self.lm_head = Einsum("BTD,DV->BTV", (c.embed_dim, c.vocab_size),
                          rngs=rngs, dtype=dtype)

  def __call__(self, tokens):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attn_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    x = self.embedder.encode(tokens)
    for layer in self.layers:
      x = layer(x, positions, attn_mask)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32)


def build(key, dtype=jnp.float32, config: Config | None = None):
  """``(params, apply_fn)``: ``params`` a plain nested dict of arrays,
  ``apply_fn(params, tokens) -> logits`` (float32) a pure function."""
  model = Qwen3(config or Config(), rngs=nnx.Rngs(params=key), dtype=dtype)
  graphdef, state = nnx.split(model)
  params = state.to_pure_dict()

  def apply_fn(params, tokens):
    fresh = jax.tree.map(lambda v: v, state)  # new Variables, then filled
    nnx.replace_by_pure_dict(fresh, params)
    return nnx.merge(graphdef, fresh)(tokens)
  return params, apply_fn
