"""Reference workload W3 (benchmarks/README.md): where parameters dominate memory.

W1's architecture at d=1024, 8 blocks, vocab 32000, batch 1 x 128 tokens,
float32 compute (about 166 M parameters), LoRA rank 8 on q, k, v, o, fc1,
fc2. Variants, each a jitted Adam step that takes exactly what its training
loop holds:

* ``full``: params + Adam state (float32);
* ``lora_f32``: float32 base + delta + the delta's Adam state;
* ``lora_f32[recompute=False]``: the same without recomputing adapters'
  inputs in the backward pass (``lj.wrap(..., recompute=False)``);
* ``lora_bf16``: the base in bfloat16, float32 factors;
* ``qlora_nf4``: the six block kernels in nf4 (block 64), everything else
  bfloat16, as QLoRA is run, through ``lj.wrap`` on the quantized base;
* ``qlora_nf4[fallback: dequantize+merge]`` and ``...[fallback:
  dequantize+factored]``: the same quantized base, dequantized inside the
  step (``lj.wrap(f, engine)(lj.dequantize(qbase), ...)``). Measured so that
  a QLoRA figure exists while the engines do not take a ``QArray`` base; if
  ``qlora_nf4`` itself cannot run, its row says why.

Reports compiled memory (argument and temp bytes, from
``jit(...).lower(...).compile().memory_analysis()``), step time (variants
interleaved, medians, ratios to full fine-tuning and to ``lora_f32``) and the
issue's targets. Writes ``benchmarks/results/w3_<platform>.json`` and ``.md``.

    python benchmarks/w3.py             # about 3 minutes on 2 CPU cores
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
import w1

import lora_jax as lj

SIZE = w1.Size(vocab=32000, d_model=1024, layers=8, heads=16, mlp=4096,
               batch=1, seq=128)
NO_RECOMPUTE = "lora_f32[recompute=False]"
FALLBACK_MERGE = "qlora_nf4[fallback: dequantize+merge]"
FALLBACK_FACTORED = "qlora_nf4[fallback: dequantize+factored]"
VARIANTS = ("full", "lora_f32", NO_RECOMPUTE, "lora_bf16", "qlora_nf4",
            FALLBACK_MERGE, FALLBACK_FACTORED)


def bases(params):
  """``{name: frozen base}``: float32, bfloat16, and QLoRA's nf4 + bf16."""
  bf16 = lambda x: x.astype(jnp.bfloat16)
  q = lj.quantize(params, "nf4", block_size=64, targets=w1.TARGETS)
  is_q = lambda x: isinstance(x, lj.QArray)
  qbase = jax.tree.map(lambda x: x if is_q(x) else bf16(x), q, is_leaf=is_q)
  return {"f32": params, "bf16": jax.tree.map(bf16, params), "nf4": qbase}


def make_steps(apply, params, frozen, delta, tokens, variants=VARIANTS):
  """``{name: (jitted step, state, frozen args)}`` as :func:`w1.make_steps`
  (``frozen``: :func:`bases`); a variant that cannot be traced maps to the
  error's text instead."""
  tx = optax.adam(1e-4)

  def lora_step(mode, prepare=lambda b: b, recompute=True):
    wrapped = lj.wrap(apply, mode, recompute=recompute)

    def step(state, base, x):
      d, opt = state
      loss = lambda d: w1.cross_entropy(wrapped(prepare(base), d, x), x)
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

  plans = {
      "lora_f32": ("factored", lambda b: b, "f32"),
      NO_RECOMPUTE: ("factored", lambda b: b, "f32", False),
      "lora_bf16": ("factored", lambda b: b, "bf16"),
      "qlora_nf4": ("factored", lambda b: b, "nf4"),
      FALLBACK_MERGE: ("merge", lj.dequantize, "nf4"),
      FALLBACK_FACTORED: ("factored", lj.dequantize, "nf4"),
  }
  steps = {}
  for v in variants:
    if v == "full":
      own = jax.tree.map(jnp.copy, params)
      steps[v] = (jax.jit(full_step, donate_argnums=0),
                  (own, tx.init(own)), ())
      continue
    mode, prepare, base, *recompute = plans[v]
    fn, state = lora_step(mode, prepare, *recompute)
    try:
      fn.lower(state, frozen[base], tokens)  # traces only: can it run?
    except Exception as e:
      steps[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      continue
    steps[v] = (fn, state, (frozen[base],))
  return steps


def arg_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def targets(results: dict) -> list[str]:
  """The issue's W3 targets, each with the measured figure."""
  lines = []
  full, f32 = results.get("full"), results.get("lora_f32")
  if not (full and f32):
    return lines
  mem = lambda r: r["memory_bytes"]
  arg = lambda r: r["argument_bytes"]
  lines.append(f"LoRA float32 base, args+temp / full: "
               f"{mem(f32) / mem(full):.3f} (target <= 0.33)")
  off = results.get(NO_RECOMPUTE)
  if off and "memory_bytes" in off:
    lines.append(f"recomputing adapters' inputs: temp {f32['temp_bytes'] / 2**20:.1f}"
                 f" MiB against {off['temp_bytes'] / 2**20:.1f} without; step "
                 f"{f32['step_ms'] / off['step_ms']:.2f}x the step without")
  for name, bound in (("lora_bf16", 0.52), ("qlora_nf4", 0.30),
                      (FALLBACK_MERGE, 0.30), (FALLBACK_FACTORED, 0.30)):
    r = results.get(name)
    if r and "memory_bytes" in r:
      lines.append(f"{name}: args / lora_f32 args: {arg(r) / arg(f32):.3f} "
                   f"(target <= {bound}); args+temp / lora_f32: "
                   f"{mem(r) / mem(f32):.3f} (target <= 1.0); args+temp / "
                   f"full: {mem(r) / mem(full):.3f}; step / lora_f32 step: "
                   f"{r['step_ms'] / f32['step_ms']:.2f}"
                   + (" (target <= 1.5)" if "qlora" in name else ""))
  return lines


def table(results: dict) -> str:
  full, f32 = results["full"], results.get("lora_f32")
  rows = ["| variant | step (ms, median) | / full | / lora_f32 | args (MiB) "
          "| temp (MiB) | args+temp (MiB) | / full | / lora_f32 | first loss |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  mib = lambda b: f"{b / 2**20:.1f}"
  for name, r in results.items():
    if "error" in r:
      rows.append(f"| {name} | not run: {r['error']} | | | | | | | | |")
      continue
    f32_ms = f"{r['step_ms'] / f32['step_ms']:.2f}" if f32 else "n/a"
    f32_mem = (f"{r['memory_bytes'] / f32['memory_bytes']:.2f}" if f32
               else "n/a")
    rows.append(
        f"| {name} | {r['step_ms']:.0f} | {r['step_ms'] / full['step_ms']:.2f}"
        f" | {f32_ms} | {mib(r['argument_bytes'])} | {mib(r['temp_bytes'])} | "
        f"{mib(r['memory_bytes'])} | "
        f"{r['memory_bytes'] / full['memory_bytes']:.2f} | {f32_mem} | "
        f"{r['loss']:.5f} |")
  return "\n".join(rows)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--name", default=None, help="results file stem")
  ap.add_argument("--tiny", action="store_true", help="a small model (smoke test)")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  size = SIZE if not args.tiny else dataclasses.replace(
      SIZE, vocab=256, d_model=128, layers=2, heads=4, mlp=256, seq=16)
  apply, params, _, delta, tokens = w1.setup(size)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  frozen = bases(params)
  steps = make_steps(apply, params, frozen, delta, tokens,
                     args.variants.split(","))
  failed = {k: v for k, v in steps.items() if isinstance(v, str)}
  results = w1.measure({k: v for k, v in steps.items() if k not in failed},
                       None, tokens, args.reps)
  for name, err in failed.items():
    results[name] = {"error": err}
  results = {v: results[v] for v in steps}  # in the order asked for
  report = {
      "workload": dataclasses.asdict(size), "params": n_params, "rank": 8,
      "alpha": 16.0, "targets": w1.TARGETS, "reps": args.reps,
      "frozen_bytes": {k: arg_bytes(v) for k, v in frozen.items()},
      "environment": {**w1.environment(), "load_avg": os.getloadavg()},
      "results": results, "wall_s": time.perf_counter() - t0}
  name = args.name or f"w3_{jax.devices()[0].platform}"
  md = table(results) + "\n\n" + w1.peak_note(
      {k: r for k, r in results.items() if "error" not in r})
  checks = targets(results)
  md += "\n\n" + "\n".join(f"- {c}" for c in checks) if checks else ""
  md += ("\n\nfrozen base bytes (MiB): " + ", ".join(
      f"{k} {v / 2**20:.1f}" for k, v in report["frozen_bytes"].items()))
  os.makedirs(w1.RESULTS, exist_ok=True)
  with open(os.path.join(w1.RESULTS, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(w1.RESULTS, f"{name}.md"), "w") as f:
    f.write(f"# {name}\n\n{json.dumps(report['environment'])}\n\n"
            f"{n_params / 1e6:.1f} M parameters; `python benchmarks/w3.py "
            f"--reps {args.reps}`\n\n{md}\n")
  print(md)
  return report


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
