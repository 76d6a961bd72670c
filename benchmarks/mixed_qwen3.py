"""Mixed-adapter inference on a tunix-style Qwen3 (``qwen3.py``).

``mixed.py``'s measurement on a Qwen3 decoder in Flax NNX (4 layers, d 256,
ffn 1024, 8 query / 4 kv heads of 32, vocab 2048, float32): batch 8 x 128
tokens, 8 rank-8 adapters on q, k, v, o, gate, up, down held in one
``lj.stack``, row ``i`` using adapter ``i``, computed in one pass with
``lj.wrap(apply, mode)(base, stacked, tokens, adapter_ids=ids)``. Variants:

- ``base``: the frozen forward, no adapter;
- ``merged``: ``lj.merge`` of one adapter once, then the plain forward: the
  yardstick (target: ``mixed_factored`` <= 1.15 x ``merged``);
- ``mixed_factored``: the stack through ``wrap(mode="factored")``;
- ``mixed_merge``: the stack through ``wrap(mode="merge")`` (one merged
  kernel per row, under ``vmap``);
- ``loop``: one ``wrap`` call per adapter on its own row, gathered back in
  row order, compiled as one program.

Each returns the logits' mean cross-entropy. Timing is ``mixed.measure``
(interleaved A B C, C B A; medians and mins). As in ``mixed.py``,
``mixed_merge`` runs in a second interleaved group with its own ``merged``
(its per-row merged kernels evict the caches of whatever runs next), its
ratios to that group's ``merged``. Before timing, the mixed outputs (both
engines) are checked against a per-row reference (row ``i`` alone through
the plain forward on ``lj.merge(base, lj.select(stacked, ids[i]))``); a
difference above ``--tol`` raises.

    python benchmarks/mixed_qwen3.py [--reps 21] [--quick]

Writes ``results/mixed_qwen3_<platform>.json`` and ``.md`` (``--quick``:
``mixed_qwen3_quick_<platform>``, a 2-layer d-64 model, 8 x 32 tokens, 3
reps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

import lora_jax as lj

# Only to report whether wrap ran the mixed batch whole or fell back to vmap.
from lora_jax._src import mixed as _mixed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mixed
import qwen3
import w1

N_ADAPTERS = 8
RANK = 8
ALPHA = 16.0


def setup(config, batch, seq, n=N_ADAPTERS, rank=RANK, seed=0):
  """``apply, base, [delta_0 .. delta_{n-1}], tokens``; each adapter with
  random nonzero ``b`` (a fresh split has ``b = 0``: every adapter would be
  the base)."""
  params, apply = qwen3.build(jax.random.key(seed), config=config)
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq), 0,
                              config.vocab_size)
  cfg = lj.LoraConfig(rank=rank, alpha=ALPHA, targets=qwen3.TARGETS)
  base, deltas = None, []
  for k in range(n):
    # layouts (einsum kernels (D, N, H), (N, H, D)) traced from apply
    b, d = lj.split(params, cfg, jax.random.key(100 + k), apply_fn=apply,
                    example_args=(tokens,))
    base = b if base is None else base
    keys = iter(jax.random.split(jax.random.key(200 + k), 256))
    d = jax.tree.map(
        lambda x, keys=keys: x.replace(b=0.02 * jax.random.normal(next(keys), x.b.shape,
                                                       x.b.dtype)),
        d, is_leaf=lambda x: isinstance(x, lj.LoraDelta))
    deltas.append(d)
  return apply, base, deltas, tokens


def check_equal(apply, base, deltas, tokens, tol):
  """Max |logit difference| of each engine's mixed pass against per-row
  merged inference with ``lj.select``; raises above ``tol``."""
  stacked = lj.stack(deltas)
  ids = mixed.row_ids(len(deltas), tokens.shape[0])
  fwd = jax.jit(apply)
  want = jnp.concatenate([
      fwd(lj.merge(base, lj.select(stacked, int(k))), tokens[i:i + 1])
      for i, k in enumerate(ids)])
  diffs = {}
  for mode in ("factored", "merge"):
    got = jax.jit(lj.wrap(apply, mode))(base, stacked, tokens, adapter_ids=ids)
    diffs[mode] = float(jnp.max(jnp.abs(got - want)))
  # the adapters must matter, or the check says nothing
  spread = float(jnp.max(jnp.abs(want - fwd(base, tokens))))
  bad = {m: d for m, d in diffs.items() if not d <= tol}
  if bad or spread <= 10 * tol:
    raise AssertionError(
        f"mixed-adapter output differs from per-row merged inference: "
        f"{bad} > {tol} (adapters move the logits by up to {spread:.3g})")
  return diffs, spread


def diagnose(apply, base, deltas, tokens):
  """Whether ``wrap(mode="factored")`` runs the mixed batch whole (one
  batched low-rank product per kernel) or falls back to ``vmap`` over rows,
  and ``lj.explain``'s rules for one adapter."""
  stacked = lj.stack(deltas)
  ids = mixed.row_ids(len(deltas), tokens.shape[0])
  whole = jax.eval_shape(
      lambda b, s, x, i: _mixed.whole_batch(
          apply, b, s, i, (x,), {}, None, strict=False, choose=None,
          recompute=True), base, stacked, tokens, ids)
  report = lj.explain(apply, base, lj.select(stacked, 0), tokens,
                      mode="factored")
  return {"whole_batch": whole is not None, "explain": str(report)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reps", type=int, default=21)
  ap.add_argument("--quick", action="store_true",
                  help="tiny model, 8 x 32 tokens, 3 reps")
  ap.add_argument("--tol", type=float, default=1e-4,
                  help="max |logit diff| against per-row merged inference")
  ap.add_argument("--name", default=None)
  args = ap.parse_args(argv)
  config = qwen3.TINY if args.quick else qwen3.Config()
  batch, seq = (8, 32) if args.quick else (8, 128)
  reps = 3 if args.quick else args.reps
  apply, base, deltas, tokens = setup(config, batch, seq)

  diffs, spread = check_equal(apply, base, deltas, tokens, args.tol)
  print("max |logit diff| mixed vs per-row merged:", diffs,
        f"(adapters move logits by up to {spread:.3g})", flush=True)
  diag = diagnose(apply, base, deltas, tokens)
  print("factored mixed batch run whole:", diag["whole_batch"], flush=True)
  print(diag["explain"], flush=True)

  res = mixed.measure(mixed.steps_for(apply, base, deltas, tokens,
                                ["base", "merged", "mixed_factored", "loop"]),
                      reps)
  merge_group = mixed.measure(mixed.steps_for(apply, base, deltas, tokens,
                                        ["merged", "mixed_merge"]),
                              max(3, reps // 3))
  for group in (res, merge_group):
    for r in group.values():
      r["ratio_to_merged"] = r["step_ms"] / group["merged"]["step_ms"]
      r["min_ratio_to_merged"] = r["min_ms"] / group["merged"]["min_ms"]
  res["mixed_merge"] = merge_group["mixed_merge"]
  for r in res.values():
    r["ratio_to_base"] = r["step_ms"] / res["base"]["step_ms"]
  print(json.dumps({k: round(v["step_ms"], 2) for k, v in res.items()}),
        flush=True)

  name = args.name or ("mixed_qwen3_" + ("quick_" if args.quick else "")
                       + jax.devices()[0].platform)
  report = {"name": "Mixed-adapter inference, Qwen3 (tunix-style, NNX)",
            "model": dataclasses.asdict(config), "batch": batch, "seq": seq,
            "adapters": N_ADAPTERS, "rank": RANK, "alpha": ALPHA,
            "targets": qwen3.TARGETS,
            "ids": [int(i) for i in mixed.row_ids(N_ADAPTERS, batch)],
            "reps": reps, "environment": w1.environment(),
            "max_abs_logit_diff": diffs, "adapter_logit_spread": spread,
            "whole_batch": diag["whole_batch"], "explain": diag["explain"],
            "results": res}
  os.makedirs(w1.RESULTS, exist_ok=True)
  with open(os.path.join(w1.RESULTS, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = markdown(report)
  with open(os.path.join(w1.RESULTS, f"{name}.md"), "w") as f:
    f.write(md)
  print(md)
  return report


def markdown(report):
  res, m = report["results"], report["model"]
  mib = mixed.mib
  rows = [f"# {report['name']}", "", json.dumps(report["environment"]), "",
          f"Qwen3 forward ({m['num_layers']} layers, d {m['embed_dim']}, ffn "
          f"{m['hidden_dim']}, {m['num_heads']} q / {m['num_kv_heads']} kv "
          f"heads of {m['head_dim']}, vocab {m['vocab_size']}), batch "
          f"{report['batch']} x {report['seq']}, {report['adapters']} adapters "
          f"of rank {report['rank']} on q,k,v,o,gate,up,down, row i -> adapter "
          f"{report['ids']}; medians of {report['reps']} interleaved reps "
          f"(`mixed_merge`: {max(3, report['reps'] // 3)} reps interleaved with "
          f"`merged` alone, its ratios to that run's `merged`; / base from its "
          f"ms).", "",
          "| variant | ms (median) | / merged | / base | ms (min) | min / merged "
          "min | args (MiB) | temp (MiB) | args + temp (MiB) |",
          "|---|---|---|---|---|---|---|---|---|"]
  for name, r in res.items():
    rows.append(f"| {name} | {r['step_ms']:.2f} | {r['ratio_to_merged']:.3f} | "
                f"{r['ratio_to_base']:.3f} | {r['min_ms']:.2f} | "
                f"{r['min_ratio_to_merged']:.3f} | "
                f"{mib(r.get('argument_bytes'))} | {mib(r.get('temp_bytes'))} | "
                f"{mib(r.get('memory_bytes'))} |")
  f, loop = res["mixed_factored"], res["loop"]
  rows += ["", f"Target mixed_factored <= 1.15 x merged (medians; mins): "
           f"{f['ratio_to_merged']:.3f}; {f['min_ratio_to_merged']:.3f}. "
           f"mixed_merge: {res['mixed_merge']['ratio_to_merged']:.3f}; "
           f"{res['mixed_merge']['min_ratio_to_merged']:.3f}. mixed_factored / "
           f"loop: {f['step_ms'] / loop['step_ms']:.3f}; "
           f"{f['min_ms'] / loop['min_ms']:.3f}.",
           f"max |logit diff| against per-row merged inference (`lj.select`): "
           f"{report['max_abs_logit_diff']} (adapters move the logits by up to "
           f"{report['adapter_logit_spread']:.3g}).",
           f"factored engine ran the mixed batch whole (not `vmap` over rows): "
           f"{report['whole_batch']}.", "", "`lj.explain` (one adapter):", "",
           "```", report["explain"].rstrip(), "```"]
  return "\n".join(rows) + "\n"


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
