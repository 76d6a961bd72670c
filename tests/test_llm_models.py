"""Models shaped like JAX LLM libraries' (tests/llm_models.py): both engines
agree on outputs and gradients, the factored engine never merges, and
``targets="all-linear"`` picks the attention and MLP weights only."""

import warnings

from helpers import assert_engines_agree
from helpers import randomize
import jax
import jax.numpy as jnp
import llm_models
import pytest

import lora_jax as lj

CASES = {
    "nnx_decoder": llm_models.nnx_decoder_case,
    "gemma_attention": llm_models.gemma_case,
    "moe_loop": lambda: llm_models.moe_case(ragged=False),
    "moe_ragged_dot": lambda: llm_models.moe_case(ragged=True),
}


def _split(name, **kw):
  params, fn, args, expected = CASES[name]()
  cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="all-linear", **kw)
  base, delta = lj.split(params, cfg, jax.random.key(7), apply_fn=fn,
                         example_args=args)
  return fn, args, base, randomize(delta), expected


@pytest.mark.parametrize("name", list(CASES))
def test_all_linear_adapts_attention_and_mlp_only(name):
  _, _, _, delta, expected = _split(name)
  assert set(lj.adapters(delta)) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_engines_agree_with_no_fallback(name):
  fn, args, base, delta, _ = _split(name)
  report = lj.explain(fn, base, delta, *args, mode="factored")
  assert report.fallbacks == {}
  assert set(report.rules) == set(lj.adapters(delta))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    g_f = assert_engines_agree(fn, base, delta, args, rtol=2e-5)
  # every adapter gets a gradient (B is random, so A's is non-zero too)
  for path, d in lj.adapters(g_f).items():
    assert float(jnp.abs(d.a).max()) > 0 and float(jnp.abs(d.b).max()) > 0, path


def test_expert_stacks_are_batch_axes():
  _, _, _, delta, _ = _split("moe_ragged_dot")
  d = lj.adapters(delta)["gate_proj"]
  assert d.layout == lj.Layout((0,), (1,), (2,))
  assert d.a.shape == (4, 8, 2) and d.b.shape == (4, 2, 12)


def test_moe_rules_named_in_the_report():
  for name, rule in (("moe_loop", "dot_general"),
                     ("moe_ragged_dot", "ragged_dot_general")):
    fn, args, base, delta, _ = _split(name)
    report = lj.explain(fn, base, delta, *args, mode="factored")
    assert report.rules["down_proj"] == [rule]


def test_gemma_kv_einsum_layout():
  _, _, _, delta, _ = _split("gemma_attention")
  d = lj.adapters(delta)
  # kv (2, K, D, H): D is contracted, the k/v axis, heads and head_dim are out
  assert d["kv_einsum"].layout == lj.Layout((), (2,), (0, 1, 3))
  assert d["q_einsum"].layout == lj.Layout((), (1,), (0, 2))
  assert d["attn_vec_einsum"].layout == lj.Layout((), (0, 1), (2,))
