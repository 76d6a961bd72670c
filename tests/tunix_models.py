"""Tiny decoders shaped as google/tunix's NNX Qwen3, Llama3 and Gemma3, with
the weights of a transformers torch model, for the PEFT-export presets.

The leaf paths, shapes and einsums are tunix's (``tunix/models/{qwen3,
llama3,gemma3}/model.py``): attention einsum weights ``w`` (``q_proj``
``(embed, heads, head_dim)``; Gemma3's ``q_einsum`` ``(heads, embed,
head_dim)``, ``kv_einsum`` ``(2, kv_heads, embed, head_dim)`` and
``attn_vec_einsum``), MLP ``nnx.Linear`` kernels ``gate_proj`` / ``up_proj`` /
``down_proj``, norms ``w`` (Gemma3: ``scale``, applied as ``1 + scale``).
The model is a pure function of a plain dict of those paths (what
``nnx.split(model)[1].to_pure_dict()`` gives), so it needs neither tunix nor
NNX. :func:`from_torch` fills it from the torch model's ``state_dict`` as
tunix's checkpoint loaders (``params*.py``) do: transposed, then reshaped to
heads.

    params, apply = from_torch("qwen3", torch_model)
    logits = apply(params, tokens)      # tokens (B, T) int -> (B, T, V)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _rms(x, w, eps, gemma):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + eps)
  return y * ((1.0 + w) if gemma else w)


def _rope(x, theta):  # x (B, T, N, H); half-split, as tunix and transformers
  h = x.shape[-1]
  inv = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  ang = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv[None, :]
  sin, cos = jnp.sin(ang)[None, :, None, :], jnp.cos(ang)[None, :, None, :]
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin,
                          second * cos + first * sin], axis=-1)


def _attention(p, x, family, c):
  gemma = family == "gemma3"
  if gemma:
    q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
    k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p["kv_einsum"]["w"])
    q = _rms(q, p["_query_norm"]["scale"], c["eps"], True)
    k = _rms(k, p["_key_norm"]["scale"], c["eps"], True)
    out_w = p["attn_vec_einsum"]["w"]
  else:
    q = jnp.einsum("BTD,DNH->BTNH", x, p["q_proj"]["w"])
    k = jnp.einsum("BSD,DKH->BSKH", x, p["k_proj"]["w"])
    v = jnp.einsum("BSD,DKH->BSKH", x, p["v_proj"]["w"])
    if family == "qwen3":
      q = _rms(q, p["q_norm"]["w"], c["eps"], False)
      k = _rms(k, p["k_norm"]["w"], c["eps"], False)
    out_w = p["o_proj"]["w"]
  q, k = _rope(q, c["theta"]), _rope(k, c["theta"])
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)  # kv head j serves query heads j*G..
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * c["scale"]
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(s, axis=-1), v)
  return jnp.einsum("BTNH,NHD->BTD", o.reshape(b, t, n, h), out_w)


def _mlp(p, x, family):
  act = (lambda z: jax.nn.gelu(z, approximate=True)) if (
      family == "gemma3") else jax.nn.silu
  return (act(x @ p["gate_proj"]["kernel"]) * (x @ p["up_proj"]["kernel"])
          ) @ p["down_proj"]["kernel"]


def make_apply(family: str, c: dict):
  """``apply(params, tokens) -> logits`` of the ``family`` decoder."""
  gemma = family == "gemma3"

  def apply(params, tokens):
    emb = params["embedder"]["input_embedding"]
    x = emb[tokens]
    if gemma:
      x = x * jnp.sqrt(jnp.float32(emb.shape[1]))
    for i in range(c["layers"]):
      p = params["layers"][str(i)]
      if gemma:
        h = _attention(p["attn"], _rms(x, p["pre_attention_norm"]["scale"],
                                       c["eps"], True), family, c)
        x = x + _rms(h, p["post_attention_norm"]["scale"], c["eps"], True)
        h = _mlp(p["mlp"], _rms(x, p["pre_ffw_norm"]["scale"], c["eps"], True),
                 family)
        x = x + _rms(h, p["post_ffw_norm"]["scale"], c["eps"], True)
      else:
        x = x + _attention(p["attn"], _rms(x, p["input_layernorm"]["w"],
                                           c["eps"], False), family, c)
        x = x + _mlp(p["mlp"], _rms(x, p["post_attention_layernorm"]["w"],
                                    c["eps"], False), family)
    if gemma:
      return _rms(x, params["final_norm"]["scale"], c["eps"], True) @ emb.T
    return _rms(x, params["final_norm"]["w"], c["eps"], False) @ (
        params["lm_head"]["w"])
  return apply


def from_torch(family: str, torch_model):
  """``(params, apply)``: the tunix-shaped ``family`` decoder ("qwen3",
  "llama3", "gemma3") with ``torch_model``'s weights."""
  cfg = torch_model.config
  sd = {k: np.asarray(v.detach().float().numpy())
        for k, v in torch_model.state_dict().items()}
  d, n, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
  h = getattr(cfg, "head_dim", None) or d // n
  gemma = family == "gemma3"
  heads = lambda w, k: w.T.reshape(d, k, h)  # torch (k*h, d) -> (d, k, h)
  arr = lambda x: jnp.asarray(x, jnp.float32)
  layers = {}
  for i in range(cfg.num_hidden_layers):
    t = lambda name, i=i: sd[f"model.layers.{i}.{name}.weight"]
    attn_o = t("self_attn.o_proj").T.reshape(n, h, d)
    mlp = {m: {"kernel": arr(t(f"mlp.{m}").T)}
           for m in ("gate_proj", "up_proj", "down_proj")}
    if gemma:
      attn = {
          "q_einsum": {"w": heads(t("self_attn.q_proj"), n).transpose(1, 0, 2)},
          "kv_einsum": {"w": np.stack([
              heads(t(f"self_attn.{m}"), kv).transpose(1, 0, 2)
              for m in ("k_proj", "v_proj")])},
          "attn_vec_einsum": {"w": attn_o},
          "_query_norm": {"scale": t("self_attn.q_norm")},
          "_key_norm": {"scale": t("self_attn.k_norm")}}
      norms = {"pre_attention_norm": {"scale": t("input_layernorm")},
               "post_attention_norm": {"scale": t("post_attention_layernorm")},
               "pre_ffw_norm": {"scale": t("pre_feedforward_layernorm")},
               "post_ffw_norm": {"scale": t("post_feedforward_layernorm")}}
    else:
      attn = {f"{m}_proj": {"w": heads(t(f"self_attn.{m}_proj"), k)}
              for m, k in (("q", n), ("k", kv), ("v", kv))}
      attn["o_proj"] = {"w": attn_o}
      if family == "qwen3":
        attn["q_norm"] = {"w": t("self_attn.q_norm")}
        attn["k_norm"] = {"w": t("self_attn.k_norm")}
      norms = {"input_layernorm": {"w": t("input_layernorm")},
               "post_attention_layernorm": {"w": t("post_attention_layernorm")}}
    layers[str(i)] = {"attn": jax.tree.map(arr, attn), "mlp": mlp,
                      **jax.tree.map(arr, norms)}
  params = {"embedder": {"input_embedding": arr(
      sd["model.embed_tokens.weight"])}, "layers": layers}
  norm = {"scale" if gemma else "w": arr(sd["model.norm.weight"])}
  params["final_norm"] = norm
  if not gemma:
    params["lm_head"] = {"w": arr(sd["lm_head.weight"].T)}
  c = {"layers": cfg.num_hidden_layers, "eps": cfg.rms_norm_eps,
       "theta": cfg.rope_theta,
       "scale": (cfg.query_pre_attn_scalar if gemma else h) ** -0.5}
  return params, make_apply(family, c)
