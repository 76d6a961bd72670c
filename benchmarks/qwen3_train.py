"""A LoRA training step on a tunix-style Qwen3 against full fine-tuning.

The model is :mod:`benchmarks.qwen3` (NNX, einsum attention with GQA, SwiGLU
MLP, shaped like google/tunix's Qwen3). LoRA rank 8, alpha 16, on q/k/v/o and
gate/up/down of every layer; loss: next-token cross-entropy; Adam. Variants,
each a jitted step with donated state that takes exactly what its training
loop holds:

* ``full``: params + Adam state (float32, nothing frozen);
* ``lora``: ``lj.wrap`` (factored engine) on the float32 base, delta + its Adam
  state;
* ``lora[merge]``: the same through the merge engine;
* ``lora[recompute=False]``: factored, without recomputing adapters' inputs
  in the backward pass;
* ``lora_bf16``: the base in bfloat16, float32 factors (factored);
* ``qlora_nf4``: the seven projections of every layer in nf4 (block 64), the
  rest bfloat16, through ``lj.wrap`` on the quantized base.

Variants run interleaved in one process after compilation; the report gives
median step times, compiled memory (arguments + temps, from
``memory_analysis()``) and ratios to full fine-tuning measured in the same
run. Writes ``benchmarks/results/qwen3_train_<size>_<platform>.json`` / ``.md``.

    python benchmarks/qwen3_train.py               # 4 layers, d=256 (CPU)
    python benchmarks/qwen3_train.py --size gpu    # Qwen3-0.6B's shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qwen3
import w1

import lora_jax as lj

# (model config, batch, sequence length)
SIZES = {
    "cpu": (qwen3.Config(), 8, 128),
    # Qwen3-0.6B's layer shapes and vocabulary (28 layers there; fewer here so
    # that five variants compile inside a short accelerator lease)
    "gpu": (qwen3.Config(num_layers=8, vocab_size=151936, embed_dim=1024,
                         hidden_dim=3072, num_heads=16, head_dim=128,
                         num_kv_heads=8), 8, 512),
    "tiny": (qwen3.TINY, 2, 16),
}
VARIANTS = ("full", "lora", "lora[merge]", "lora_bf16", "qlora_nf4")


def make_steps(apply, params, delta, variants, config):
  tx = optax.adam(1e-4)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  frozen = {"f32": params}
  if {"lora_bf16", "qlora_nf4"} & set(variants):
    frozen["bf16"] = jax.tree.map(bf16, params)
  if "qlora_nf4" in variants:
    q = lj.quantize(params, "nf4", block_size=min(64, config.head_dim), targets=qwen3.TARGETS,
                    delta=delta)
    is_q = lambda x: isinstance(x, lj.QArray)
    frozen["nf4"] = jax.tree.map(lambda x: x if is_q(x) else bf16(x), q,
                                 is_leaf=is_q)

  def lora_step(mode, recompute=True):
    wrapped = lj.wrap(apply, mode, recompute=recompute)

    def step(state, base, x):
      d, opt = state
      loss = lambda d: w1.cross_entropy(wrapped(base, d, x), x)
      l, g = jax.value_and_grad(loss)(d)
      u, opt = tx.update(g, opt, d)
      return (optax.apply_updates(d, u), opt), l
    own = jax.tree.map(jnp.copy, delta)  # each variant donates its own state
    return jax.jit(step, donate_argnums=0), (own, tx.init(own))

  def full_step(state, x):
    p, opt = state
    l, g = jax.value_and_grad(lambda p: w1.cross_entropy(apply(p, x), x))(p)
    u, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, u), opt), l

  plans = {"lora": ("factored", "f32"), "lora[merge]": ("merge", "f32"),
           "lora[recompute=False]": ("factored", "f32", False),
           "lora_bf16": ("factored", "bf16"), "qlora_nf4": ("factored", "nf4")}
  steps = {}
  for v in variants:
    if v == "full":
      own = jax.tree.map(jnp.copy, params)
      steps[v] = (jax.jit(full_step, donate_argnums=0), (own, tx.init(own)),
                  ())
    else:
      mode, base, *recompute = plans[v]
      fn, state = lora_step(mode, *recompute)
      steps[v] = (fn, state, (frozen[base],))
  return steps, {k: sum(x.nbytes for x in jax.tree.leaves(v))
                 for k, v in frozen.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
  ap.add_argument("--layers", type=int, default=None, help="override layers")
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--name", default=None, help="results file stem")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  config, batch, seq = SIZES[args.size]
  if args.layers:
    config = dataclasses.replace(config, num_layers=args.layers)
  variants = args.variants.split(",")
  params, apply = qwen3.build(jax.random.key(0), config=config)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0,
                              config.vocab_size)
  _, delta = lj.split(params, lj.LoraConfig(rank=8, alpha=16.0,
                                            targets=qwen3.TARGETS),
                      jax.random.key(2), apply, (tokens[:1, :8],))
  steps, frozen_bytes = make_steps(apply, params, delta, variants, config)
  results = w1.measure(steps, None, tokens, args.reps)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  report = {"size": args.size, "model": dataclasses.asdict(config),
            "batch": [batch, seq], "params": n_params, "rank": 8,
            "alpha": 16.0, "targets": qwen3.TARGETS, "reps": args.reps,
            "frozen_bytes": frozen_bytes,
            "environment": {**w1.environment(), "load_avg": os.getloadavg()},
            "results": results, "wall_s": time.perf_counter() - t0}
  name = args.name or f"qwen3_train_{args.size}_{jax.devices()[0].platform}"
  md = (f"# {name}\n\n{json.dumps(report['environment'])}\n\n"
        f"tunix-style Qwen3 (`benchmarks/qwen3.py`), {config.num_layers} "
        f"layers, d={config.embed_dim}, ffn {config.hidden_dim}, heads "
        f"{config.num_heads}/{config.num_kv_heads}x{config.head_dim}, vocab "
        f"{config.vocab_size}, {n_params / 1e6:.1f} M parameters; batch "
        f"{batch} x {seq}; LoRA rank 8 on q/k/v/o/gate/up/down; Adam; medians "
        f"of {args.reps} interleaved reps. `python benchmarks/qwen3_train.py "
        f"--size {args.size}`\n\n" + w1.table(results) + "\n\n"
        + w1.peak_note(results) + "\n")
  w1.save_results(name, report, md)
  print(md)
  return report


if __name__ == "__main__":
  main()
