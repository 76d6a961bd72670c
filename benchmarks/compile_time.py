"""Trace and compile time of a training step on a deep unscanned NNX decoder.

The factored engine re-evaluates the traced program with its own rules, so
its step takes longer to trace than full fine-tuning's; this measures by how
much (benchmarks/README.md: a 48-layer unscanned NNX
decoder, target <= 1.2x full fine-tuning's trace + compile).

Model: ``benchmarks/qwen3.py``'s tunix-style Qwen3 with ``--layers`` layers
(default 48; d 256, ffn 1024, vocab 2048), batch 2 x 64 tokens, Adam. Steps:

- ``full``: full fine-tuning, grad over every parameter;
- ``factored``: LoRA rank 8 on q/k/v/o/gate/up/down through
  ``lj.wrap(apply, "factored")``, grad over the delta (recompute on);
- ``factored[recompute=False]``;
- ``merge``: ``lj.wrap(apply, "merge")``.

Each rep builds fresh jitted steps (no trace cache) and times
``jit(step).trace(...)`` (Python tracing, ``.lower()`` where this JAX has no
``trace``), ``.lower()`` and ``.compile()``; reps interleave the variants,
medians are reported. Each phase is timed twice: wall clock, and the
process's CPU time (all threads), which other jobs on a shared machine
disturb less (XLA:CPU compiles with several threads, so CPU time can exceed
wall time on an idle machine). The size of what XLA compiles is counted too:
StableHLO ops and ``dot_general``s of the lowered module, fusions and
instructions of the compiled one.

    python benchmarks/compile_time.py [--layers 48] [--reps 3]
    python benchmarks/compile_time.py --model w1 --reps 5

``--model w1`` measures the same steps on W1 (``benchmarks/w1.py``'s
decoder; target <= 1.0x full fine-tuning's). W1's own table times
``lower`` + ``compile`` once per variant; this one interleaves reps of
fresh steps and times the trace too.

Writes ``results/compile_time[_w1]_<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import re
import statistics
import sys
import time

import jax
import optax

import lora_jax as lj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qwen3
import w1

VARIANTS = ("full", "factored", "factored[recompute=False]", "merge")


def make_step(variant, apply):
  """``(step, state)``: a jitted Adam step on what the variant trains."""
  tx = optax.adam(1e-4)
  if variant == "full":
    def loss(p, base, x):
      del base
      return w1.cross_entropy(apply(p, x), x)
  else:
    mode, _, opt = variant.partition("[")
    g = lj.wrap(apply, mode, recompute=opt != "recompute=False]")

    def loss(d, base, x):
      return w1.cross_entropy(g(base, d, x), x)

  def step(state, base, x):
    trained, opt_state = state
    l, grads = jax.value_and_grad(loss)(trained, base, x)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return (optax.apply_updates(trained, updates), opt_state), l
  return jax.jit(step, donate_argnums=0), tx


def time_variant(variant, apply, params, base, delta, tokens) -> dict:
  step, tx = make_step(variant, apply)
  trained = params if variant == "full" else delta
  state = (trained, tx.init(trained))
  frozen = None if variant == "full" else base
  gc.collect()  # no variant pays for another's garbage
  t0, c0 = time.perf_counter(), time.process_time()
  if hasattr(step, "trace"):
    traced = step.trace(state, frozen, tokens)
    t1, c1 = time.perf_counter(), time.process_time()
    lowered = traced.lower()
  else:
    lowered = step.lower(state, frozen, tokens)
    t1, c1 = time.perf_counter(), time.process_time()
  t2, c2 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t3, c3 = time.perf_counter(), time.process_time()
  return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2,
          "total_s": t3 - t0, "trace_cpu_s": c1 - c0, "lower_cpu_s": c2 - c1,
          "compile_cpu_s": c3 - c2, "total_cpu_s": c3 - c0,
          **hlo_size(lowered, compiled)}


def hlo_size(lowered, compiled) -> dict:
  """What XLA is given and what it makes of it: StableHLO ops and
  ``dot_general``s of the lowered module; instructions (outside and inside
  fusions) and fusions of the optimised HLO."""
  ops = collections.Counter(re.findall(r"= \"?(stablehlo\.[a-z_]+)",
                                       lowered.as_text()))
  hlo = compiled.as_text() or ""
  return {"stablehlo_ops": sum(ops.values()),
          "stablehlo_dots": ops["stablehlo.dot_general"],
          "hlo_instructions": len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", hlo,
                                             re.M)),
          "hlo_fusions": len(re.findall(r" fusion\(", hlo)),
          "hlo_entry_ops": entry_ops(hlo)}


# entry instructions that do no work of their own (no thunk on XLA:CPU)
_NO_WORK = ("parameter", "constant", "bitcast", "get-tuple-element", "tuple")


def entry_ops(hlo: str) -> int:
  """Instructions of the optimised module's entry computation that do work
  (fusions, dots, copies, ...): on XLA:CPU each becomes a thunk of the
  executable, and building the thunks' dependency graph grows faster than
  their number (benchmarks/README.md, "Compile time")."""
  entry = hlo[hlo.find("\nENTRY"):]
  entry = entry[:entry.find("\n}")]
  ops = re.findall(r"^\s+(?:ROOT )?%\S+ = \S+ ([a-z-]+)\(", entry, re.M)
  return sum(op not in _NO_WORK for op in ops)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=48)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--name", default=None)
  ap.add_argument("--model", choices=("qwen3", "w1"), default="qwen3",
                  help="w1: the W1 decoder of benchmarks/w1.py (--layers "
                  "ignored)")
  args = ap.parse_args(argv)
  if args.model == "w1":
    apply, params, base, delta, tokens = w1.setup(w1.SIZES["w1"])
    model = {"model": "w1", **dataclasses.asdict(w1.SIZES["w1"])}
    what = ("W1 (GPT-style decoder, 4 blocks, d 512, Flax Linen), batch 8 x "
            "128, LoRA rank 8 on q, k, v, o, fc1, fc2")
    target = "factored trace + compile <= 1.0x full fine-tuning's (W1)"
  else:
    config = dataclasses.replace(qwen3.Config(), num_layers=args.layers)
    params, apply = qwen3.build(jax.random.key(0), config=config)
    tokens = jax.random.randint(jax.random.key(1), (2, 64),
                                0, config.vocab_size)
    base, delta = lj.split(params, lj.LoraConfig(
        rank=8, targets=qwen3.TARGETS), jax.random.key(2), apply, (tokens,))
    model = dataclasses.asdict(config)
    what = (f"{args.layers}-layer unscanned tunix-style Qwen3 (NNX), batch "
            f"2 x 64")
    target = "factored trace + compile <= 1.2x full fine-tuning's"
  variants = args.variants.split(",")
  runs = {v: [] for v in variants}
  for rep in range(args.reps):
    for v in (variants if rep % 2 == 0 else variants[::-1]):
      runs[v].append(time_variant(v, apply, params, base, delta, tokens))
      print(v, {k: round(x, 2) for k, x in runs[v][-1].items()}, flush=True)
  results = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
             for v, rs in runs.items()}
  full = results.get("full")
  for r in results.values():
    if full:
      r["total_over_full"] = r["total_s"] / full["total_s"]
      r["total_cpu_over_full"] = r["total_cpu_s"] / full["total_cpu_s"]
  name = args.name or (f"compile_time{'_w1' if args.model == 'w1' else ''}"
                       f"_{jax.devices()[0].platform}")
  report = {"layers": args.layers, "model": model,
            "batch": list(tokens.shape), "reps": args.reps,
            "environment": w1.environment(), "results": results,
            "runs": runs}
  nan = float("nan")
  rows = ["| variant | trace (s) | lower (s) | compile (s) | total (s) | / full "
          "| CPU: trace | lower | compile | total | / full |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for v, r in results.items():
    rows.append(f"| {v} | {r['trace_s']:.2f} | {r['lower_s']:.2f} | "
                f"{r['compile_s']:.2f} | {r['total_s']:.2f} | "
                f"{r.get('total_over_full', nan):.2f} | "
                f"{r['trace_cpu_s']:.2f} | {r['lower_cpu_s']:.2f} | "
                f"{r['compile_cpu_s']:.2f} | {r['total_cpu_s']:.2f} | "
                f"{r.get('total_cpu_over_full', nan):.2f} |")
  rows += ["", "| variant | StableHLO ops | dot_general | HLO instructions "
           "(optimised) | fusions | entry ops (thunks) |",
           "|---|---|---|---|---|---|"]
  for v, r in results.items():
    rows.append(f"| {v} | {r['stablehlo_ops']:.0f} | "
                f"{r['stablehlo_dots']:.0f} | {r['hlo_instructions']:.0f} | "
                f"{r['hlo_fusions']:.0f} | {r['hlo_entry_ops']:.0f} |")
  command = " ".join(sys.argv[1:] if argv is None else argv)
  md = (f"# {name}\n\n{json.dumps(report['environment'])}\n\n"
        f"{what}, Adam step; medians of {args.reps} interleaved reps, each "
        f"with fresh jitted steps. `python benchmarks/compile_time.py "
        f"{command}`\n\n" + "\n".join(rows) + f"\n\nTarget: {target}.\n")
  w1.save_results(name, report, md)
  print(md)
  return report


if __name__ == "__main__":
  main()
