"""Mixed-adapter inference on W1 (benchmarks/README.md).

W1's forward (batch 8 x 128 tokens) with 8 rank-8 adapters on q, k, v, o,
fc1, fc2 held in one ``lj.stack``, every row of the batch a different adapter,
computed in one pass with ``lj.wrap(apply, mode)(base, stacked, tokens,
adapter_ids=ids)``, in both engines. Against it, interleaved in the same
process:

- ``base``: the frozen forward, no adapter;
- ``merged``: merged single-adapter inference (``lj.merge`` once, then the
  plain forward): the target's yardstick;
- ``single_factored``: one unmerged adapter through ``lj.wrap`` (what PEFT's
  "1.16x the base forward" anchor measures);
- ``loop``: a loop over the adapters, one ``wrap`` call per adapter on its own
  rows (here one row each), gathered back in row order; compiled as one
  program, so no Python dispatch is counted against it.

Every variant returns the logits' mean cross-entropy (as in ``w1.py``), so
the outputs are a scalar and memory is the program's own. Then the scaling
sweep: n = 1, 2, 4, ..., 64 adapters in the stack with the batch fixed at 8
rows (row ``i`` uses adapter ``i * n // 8``, all different from n = 8 on):
the work per row is constant, so the time should stay flat while the stack's
argument bytes grow with n.

    python benchmarks/mixed.py [--reps 9] [--quick]

Writes ``results/mixed_<platform>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj

# Only to force each of the two vmap-over-rows contractions in the scaling
# sweep (lj.wrap runs the batch whole, else gathers each row's factors).
from lora_jax._src.wrap import wrap_rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import w1

SCALING = (1, 2, 4, 8, 16, 32, 64)
# mixed_factored[one-hot] / [gather]: the factored engine under vmap over
# rows (what wrap falls back to where it cannot run the batch whole), the
# stack entering each row as a one-hot contraction over all adapters, or as
# the row's own gathered factors, whatever the stack's size
# (wrap_rows(..., rows="one-hot" / "gather")).


def make_adapters(size, n, rank=8, seed=0):
  """``apply, base, [delta_0 .. delta_{n-1}], tokens``: n adapters of one
  model with random nonzero ``b`` (a fresh split has ``b = 0``, which would
  make every adapter the base)."""
  apply, _, base, delta, tokens = w1.setup(size, rank=rank, seed=seed)
  config = lj.LoraConfig(rank=rank, alpha=16.0, targets=w1.TARGETS)
  deltas = []
  for k in range(n):
    _, d = lj.split(base, config, jax.random.key(100 + k))
    keys = iter(jax.random.split(jax.random.key(200 + k), 64))
    d = jax.tree.map(
        lambda x, keys=keys: x.replace(b=0.02 * jax.random.normal(next(keys), x.b.shape,
                                                       x.b.dtype)),
        d, is_leaf=lambda x: isinstance(x, lj.LoraDelta))
    deltas.append(d)
  del delta
  return apply, base, deltas, tokens


def row_ids(n, batch):
  return jnp.asarray([i * n // batch for i in range(batch)], jnp.int32)


def steps_for(apply, base, deltas, tokens, variants):
  """``{name: (jitted fn, args)}``; each fn returns the mean cross-entropy."""
  n, batch = len(deltas), tokens.shape[0]
  ce = w1.cross_entropy
  out = {}
  stacked = lj.stack(deltas)
  ids = row_ids(n, batch)
  for v in variants:
    if v == "base":
      out[v] = (jax.jit(lambda p, x: ce(apply(p, x), x)), (base, tokens))
    elif v == "merged":
      merged = lj.merge(base, deltas[0])
      out[v] = (jax.jit(lambda p, x: ce(apply(p, x), x)), (merged, tokens))
    elif v == "single_factored":
      g = lj.wrap(apply, "factored")
      out[v] = (jax.jit(lambda b, d, x, g=g: ce(g(b, d, x), x)),
                (base, deltas[0], tokens))
    elif v.startswith("mixed_"):
      mode, _, how = v.split("_", 1)[1].partition("[")
      g = wrap_rows(apply, mode, rows=how.rstrip("]") or "auto")
      # g bound now: a later variant rebinds the name
      out[v] = (jax.jit(lambda b, s, x, i, g=g: ce(g(b, s, x, adapter_ids=i),
                                                   x)),
                (base, stacked, tokens, ids))
    elif v == "loop":
      groups = [np.flatnonzero(np.asarray(ids) == k) for k in range(n)]
      groups = [(k, r) for k, r in enumerate(groups) if len(r)]
      order = np.argsort(np.concatenate([r for _, r in groups]))
      g = lj.wrap(apply, "factored")

      def loop(b, ds, x, groups=groups, order=order, g=g):
        parts = [g(b, ds[k], x[r]) for k, r in groups]
        return ce(jnp.concatenate(parts)[order], x)
      out[v] = (jax.jit(loop), (base, deltas, tokens))
    else:
      raise ValueError(f"unknown variant {v!r}")
  return out


def measure(steps, reps):
  """Compiles each variant (memory from ``memory_analysis``), then times them
  interleaved (A B C, C B A, ...); medians in ms."""
  compiled, out = {}, {}
  for name, (fn, args) in steps.items():
    t0 = time.perf_counter()
    exe = fn.lower(*args).compile()
    out[name] = {"compile_s": time.perf_counter() - t0}
    out[name].update(w1.memory_stats(exe))
    out[name]["loss"] = float(exe(*args))  # warm up
    compiled[name] = (exe, args)
  times = {name: [] for name in steps}
  names = list(compiled)
  for rep in range(reps):
    for name in (names if rep % 2 == 0 else names[::-1]):
      exe, args = compiled[name]
      t0 = time.perf_counter()
      jax.block_until_ready(exe(*args))
      times[name].append(time.perf_counter() - t0)
  for name in steps:
    out[name]["step_ms"] = 1e3 * statistics.median(times[name])
    # the fastest rep: on a shared, loaded machine the least disturbed one
    out[name]["min_ms"] = 1e3 * min(times[name])
    out[name]["step_ms_all"] = [round(1e3 * t, 3) for t in times[name]]
  return out


def check_equal(apply, base, deltas, tokens):
  """The mixed pass equals per-row single-adapter inference (sanity check
  before timing): max |logit difference| per engine."""
  stacked = lj.stack(deltas)
  ids = row_ids(len(deltas), tokens.shape[0])
  want = jnp.concatenate([
      jax.jit(apply)(lj.merge(base, deltas[int(k)]), tokens[i:i + 1])
      for i, k in enumerate(ids)])
  diffs = {}
  for mode in ("factored", "merge"):
    got = jax.jit(lj.wrap(apply, mode))(base, stacked, tokens, adapter_ids=ids)
    diffs[mode] = float(jnp.max(jnp.abs(got - want)))
  return diffs


def mib(x):
  return f"{x / 2**20:.1f}" if x is not None else "n/a"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reps", type=int, default=41)
  ap.add_argument("--quick", action="store_true", help="tiny model, 3 reps")
  ap.add_argument("--name", default=None)
  args = ap.parse_args(argv)
  size = w1.SIZES["tiny" if args.quick else "w1"]
  reps = 3 if args.quick else args.reps
  apply, base, deltas, tokens = make_adapters(size, 64)
  main_n = 8
  diffs = check_equal(apply, base, deltas[:main_n], tokens)
  print("max |logit diff| mixed vs per-row merged:", diffs, flush=True)

  # Two interleaved groups, each with its own "merged" yardstick: the merge
  # engine's step holds 550 MiB of temporaries and, interleaved with the
  # rest, evicts the caches of whichever variant runs after it.
  variants = ["base", "merged", "single_factored", "mixed_factored", "loop"]
  res = measure(steps_for(apply, base, deltas[:main_n], tokens, variants), reps)
  merge_group = measure(steps_for(apply, base, deltas[:main_n], tokens,
                                  ["merged", "mixed_merge"]), max(3, reps // 3))
  for group in (res, merge_group):
    for r in group.values():
      r["ratio_to_merged"] = r["step_ms"] / group["merged"]["step_ms"]
      r["min_ratio_to_merged"] = r["min_ms"] / group["merged"]["min_ms"]
  res["mixed_merge"] = merge_group["mixed_merge"]
  for r in res.values():
    r["ratio_to_base"] = r["step_ms"] / res["base"]["step_ms"]
  print(json.dumps({k: round(v["step_ms"], 2) for k, v in res.items()}),
        flush=True)

  scaling = {}
  for mode in ("factored", "factored[one-hot]", "factored[gather]", "merge"):
    steps = {}
    for n in SCALING:
      steps.update({f"{mode}_n{n}": s for s in steps_for(
          apply, base, deltas[:n], tokens, [f"mixed_{mode}"]).values()})
    steps["merged"] = steps_for(apply, base, deltas[:1], tokens,
                                ["merged"])["merged"]
    r = measure(steps, max(3, reps // 3))
    ref = r["merged"]["step_ms"]
    ref_min = r["merged"]["min_ms"]
    scaling[mode] = {
        n: {"step_ms": r[f"{mode}_n{n}"]["step_ms"],
            "ratio_to_merged": r[f"{mode}_n{n}"]["step_ms"] / ref,
            "min_ms": r[f"{mode}_n{n}"]["min_ms"],
            "min_ratio_to_merged": r[f"{mode}_n{n}"]["min_ms"] / ref_min,
            "argument_bytes": r[f"{mode}_n{n}"].get("argument_bytes"),
            "temp_bytes": r[f"{mode}_n{n}"].get("temp_bytes")}
        for n in SCALING}
    scaling[mode]["merged_ms"] = ref
    scaling[mode]["merged_min_ms"] = ref_min
    print(mode, json.dumps({n: round(v["step_ms"], 2) for n, v in
                            scaling[mode].items() if isinstance(n, int)}),
          flush=True)

  name = args.name or ("mixed_" + ("quick_" if args.quick else "")
                       + jax.devices()[0].platform)
  report = {"workload": dataclasses.asdict(size), "adapters": main_n,
            "rank": 8, "alpha": 16.0, "targets": w1.TARGETS,
            "ids": [int(i) for i in row_ids(main_n, size.batch)],
            "reps": reps, "environment": w1.environment(),
            "max_abs_logit_diff": diffs, "results": res,
            "scaling": {"batch": size.batch,
                        "ids": "row i uses adapter i * n // batch",
                        "by_engine": scaling}}
  os.makedirs(w1.RESULTS, exist_ok=True)
  with open(os.path.join(w1.RESULTS, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = markdown(report)
  with open(os.path.join(w1.RESULTS, f"{name}.md"), "w") as f:
    f.write(md)
  plot(report, os.path.join(w1.RESULTS, f"{name}.png"))
  print(md)
  return report


def markdown(report):
  res = report["results"]
  rows = [f"# {report.get('name', 'Mixed-adapter inference')}", "",
          json.dumps(report["environment"]), "",
          f"W1 forward, batch {report['workload']['batch']} x "
          f"{report['workload']['seq']}, {report['adapters']} adapters of rank "
          f"{report['rank']} on q,k,v,o,fc1,fc2, row i -> adapter "
          f"{report['ids']}; medians of {report['reps']} interleaved reps "
          f"(`mixed_merge`: {max(3, report['reps'] // 3)} reps interleaved "
          f"with `merged` alone, its ratios to that run's `merged`; / base "
          f"from its ms).", "",
          "| variant | ms (median) | / merged | / base | ms (min) | min / merged "
          "min | args (MiB) | temp (MiB) | args + temp (MiB) |",
          "|---|---|---|---|---|---|---|---|---|"]
  for name, r in res.items():
    rows.append(f"| {name} | {r['step_ms']:.1f} | {r['ratio_to_merged']:.3f} | "
                f"{r['ratio_to_base']:.3f} | {r['min_ms']:.1f} | "
                f"{r['min_ratio_to_merged']:.3f} | {mib(r.get('argument_bytes'))} | "
                f"{mib(r.get('temp_bytes'))} | {mib(r.get('memory_bytes'))} |")
  m, loop = res["mixed_factored"], res["loop"]
  rows += ["", f"Target mixed <= 1.10 x merged (medians; mins): factored "
           f"{m['ratio_to_merged']:.3f}; {m['min_ratio_to_merged']:.3f}, merge "
           f"{res['mixed_merge']['ratio_to_merged']:.3f}; "
           f"{res['mixed_merge']['min_ratio_to_merged']:.3f}. Mixed "
           f"(factored) / loop: {m['step_ms'] / loop['step_ms']:.3f}; "
           f"{m['min_ms'] / loop['min_ms']:.3f}.",
           f"max |logit diff| against per-row merged inference: "
           f"{report['max_abs_logit_diff']}", "",
           f"## Scaling: n adapters in the stack, batch "
           f"{report['scaling']['batch']} ({report['scaling']['ids']})", "",
           "Each cell: ms (median), / merged (medians), / merged (mins), args + "
           "temp MiB. `factored` is what `lj.wrap` does (the batch run whole, "
           "each adapted matmul's branch one batched product over rows); the "
           "next two are its `vmap`-over-rows fallback with each contraction "
           "forced (wrap's own fallback gathers).", "",
           "| n | " + " | ".join(report["scaling"]["by_engine"]) + " |",
           "|---|" + "---|" * len(report["scaling"]["by_engine"])]
  engines = report["scaling"]["by_engine"]
  for n in SCALING:
    cells = []
    for data in engines.values():
      a = data[n]
      mem = (a["argument_bytes"] + a["temp_bytes"]
             if a.get("argument_bytes") is not None else None)
      cells.append(f"{a['step_ms']:.1f}; {a['ratio_to_merged']:.3f}; "
                   f"{a['min_ratio_to_merged']:.3f}; {mib(mem)}")
    rows.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def plot(report, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing: no PNG")
    return
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for engine, data in report["scaling"]["by_engine"].items():
    ax1.plot(SCALING, [data[n]["ratio_to_merged"] for n in SCALING], "o-",
             label=f"mixed, {engine}")
    ax2.plot(SCALING, [(data[n]["argument_bytes"] + data[n]["temp_bytes"])
                       / 2**20 for n in SCALING], "o-", label=f"mixed, {engine}")
  ax1.axhline(1.10, ls="--", c="gray", label="target 1.10")
  ax1.axhline(1.0, ls=":", c="k", label="merged single adapter")
  ax1.set(xscale="log", xlabel="adapters in the stack", xticks=SCALING,
          xticklabels=SCALING, ylabel="time / merged single-adapter",
          title=f"W1 forward, batch {report['scaling']['batch']}")
  ax2.set(xscale="log", xlabel="adapters in the stack", xticks=SCALING,
          xticklabels=SCALING, ylabel="compiled args + temp (MiB)",
          title="memory")
  ax1.legend()
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
