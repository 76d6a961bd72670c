"""Trainable tokens: what the gradient step holds in memory (issue 23).

A model with W3's embedding (vocab 32000, d 1024, tied output head), two
dense layers with LoRA rank 8 on them, 1 x 128 tokens, and 16 trainable
token rows. Variants, each ``jax.grad`` of the loss, compiled for this
machine, compared by ``memory_analysis()`` (temp bytes: what the step
allocates besides its arguments and outputs) and by the gradient's size:

* ``tokens_factored``: ``lj.wrap(f, "factored")``, gradient of the delta
  (the 16 rows' values and the LoRA factors);
* ``tokens_merge``: ``lj.wrap(f, "merge")``, the same gradient, through the
  merged table (its backward builds the full table's cotangent);
* ``full_table``: the table itself trainable (gradient of the table and the
  LoRA factors, factored engine), what one trains without trainable tokens.

Writes ``benchmarks/results/trainable_tokens_<platform>.json`` and ``.md``.

    python benchmarks/trainable_tokens.py      # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

import lora_jax as lj

VOCAB, DIM, SEQ, N_TOKENS = 32000, 1024, 128, 16
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def model(p, ids):
  h = jnp.take(p["embed"], ids, axis=0)
  h = jax.nn.gelu(h @ p["fc1"]["kernel"])
  h = h @ p["fc2"]["kernel"]
  return h @ p["embed"].T  # tied head


def loss_of(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def main():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"embed": jax.random.normal(keys[0], (VOCAB, DIM)) * 0.02,
            "fc1": {"kernel": jax.random.normal(keys[1], (DIM, DIM)) * 0.03},
            "fc2": {"kernel": jax.random.normal(keys[2], (DIM, DIM)) * 0.03}}
  ids = jax.random.randint(keys[3], (1, SEQ), 0, VOCAB)
  config = lj.LoraConfig(rank=8, targets=r"fc\d/kernel", trainable_tokens={
      "embed": list(range(VOCAB - N_TOKENS, VOCAB))})
  base, delta = lj.split(params, config, jax.random.key(1))

  def tokens_step(mode):
    apply = lj.wrap(model, mode)
    return jax.grad(lambda d, b, x: loss_of(apply(b, d, x), x)), (delta,)

  _, lora_only = lj.split(params, lj.LoraConfig(rank=8, targets=r"fc\d/kernel"),
                          jax.random.key(1))
  apply = lj.wrap(model, "factored")

  def full(t, d, b, x):
    return loss_of(apply(lj.with_leaves(b, {"embed": t}), d, x), x)
  variants = {
      "tokens_factored": tokens_step("factored"),
      "tokens_merge": tokens_step("merge"),
      "full_table": (jax.grad(full, argnums=(0, 1)),
                     (base["embed"], lora_only)),
  }
  report = {"platform": jax.default_backend(), "jax": jax.__version__,
            "vocab": VOCAB, "dim": DIM, "tokens": SEQ, "trainable_rows":
            N_TOKENS, "variants": {}}
  for name, (fn, first) in variants.items():
    compiled = jax.jit(fn).lower(*first, base, ids).compile()
    mem = compiled.memory_analysis()
    grad_shapes = jax.eval_shape(fn, *first, base, ids)
    grad_bytes = sum(x.size * x.dtype.itemsize
                     for x in jax.tree.leaves(grad_shapes))
    report["variants"][name] = {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "gradient_bytes": int(grad_bytes)}
  os.makedirs(RESULTS, exist_ok=True)
  name = f"trainable_tokens_{report['platform']}"
  with open(os.path.join(RESULTS, name + ".json"), "w") as f:
    json.dump(report, f, indent=1)
  mib = lambda b: f"{b / 2**20:.2f}"
  rows = ["| variant | temp (MiB) | gradient (MiB) |", "|---|---|---|"]
  for k, r in report["variants"].items():
    rows.append(f"| {k} | {mib(r['temp_bytes'])} | "
                f"{mib(r['gradient_bytes'])} |")
  md = (f"# Trainable tokens: the gradient step's memory "
        f"({report['platform']}, jax {report['jax']})\n\n"
        f"Table ({VOCAB}, {DIM}) float32 = {mib(VOCAB * DIM * 4)} MiB, tied "
        f"head, {N_TOKENS} trainable rows, LoRA rank 8 on two {DIM}x{DIM} "
        f"layers, 1 x {SEQ} tokens. `python benchmarks/trainable_tokens.py`."
        f"\n\n" + "\n".join(rows) + "\n")
  with open(os.path.join(RESULTS, name + ".md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
