from cases import CASES
import jax
import jax.numpy as jnp

import lora_jax as lj


def test_summary_counts():
  case = CASES["attention"]
  base, delta = case.split(rank=2)
  text = lj.summary(base, delta)
  total_base = sum(x.size for x in jax.tree.leaves(base))
  lora = sum(x.size for x in jax.tree.leaves(delta))
  # q, k, v: a (8, 2) + b (2, 2, 4) = 32 each; out: a (2, 4, 2) + b (2, 8) = 32
  assert lora == 4 * 32
  first = text.splitlines()[0]
  assert first.startswith(f"trainable {lora:,} / total {total_base + lora:,}")
  assert f"({100 * lora / (total_base + lora):.2f}%)" in first
  rows = [l for l in text.splitlines() if l.startswith(("query", "key", "value", "out"))]
  assert len(rows) == 4 and all(l.split()[-1] == "32" for l in rows)


def test_summary_with_trainable_and_describe():
  params = {"fc": {"kernel": jnp.ones((10, 6)), "bias": jnp.zeros(6)}}
  base, delta = lj.split(params, lj.LoraConfig(rank=3), jax.random.key(0))
  text = lj.summary(base, delta, trainable=r".*/bias")
  assert text.splitlines()[0] == (
      "trainable 54 / total 114 parameters (47.37%); frozen base 60, "
      "adapters 48, trained base leaves 6")
  assert lj.describe(delta) == (
      "fc/kernel  kernel (10, 6)  rank 3  scale 5.33333  a f32[10,3]  b f32[3,6]")
