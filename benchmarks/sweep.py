"""How LoRA step cost grows on W1's shapes: rank, targeted kernels, sequence.

For each setting, ``full``, ``merge``, ``factored`` and ``auto`` run interleaved
in one process; the ratios to ``full`` of the same group are what to read.
Writes ``results/sweep_<platform>.json``, ``.md`` and ``.png``.

    python benchmarks/sweep.py [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import w1

KERNEL_SETS = {
    "2 (q,v)": r".*/(q|v)/kernel",
    "4 (q,k,v,o)": r".*/(q|k|v|o)/kernel",
    "6 (all)": w1.TARGETS,
}
VARIANTS = ["full", "merge", "factored", "auto"]


def run_group(size, rank, targets, reps):
  apply, params, base, delta, tokens = w1.setup(size, rank=rank, targets=targets)
  steps = w1.make_steps(apply, params, base, delta, tokens, VARIANTS)
  res = w1.measure(steps, base, tokens, reps)
  full = res["full"]["step_ms"]
  return {v: {"step_ms": r["step_ms"], "ratio_to_full": r["step_ms"] / full,
              "memory_bytes": r.get("memory_bytes"),
              "compile_s": r["compile_s"]} for v, r in res.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="fewer settings")
  args = ap.parse_args(argv)
  size = w1.SIZES["w1"]
  ranks = [4, 16, 64] if args.quick else [4, 8, 16, 64, 256]
  seqs = [64, 256] if args.quick else [32, 64, 128, 256]
  out = {"environment": w1.environment(), "workload": dataclasses.asdict(size),
         "rank": [], "kernels": [], "seq": []}
  for r in ranks:
    g = run_group(size, r, w1.TARGETS, args.reps)
    out["rank"].append({"rank": r, **g})
    print(f"rank {r}: " + ", ".join(f"{v} {g[v]['ratio_to_full']:.2f}" for v in g), flush=True)
  for label, targets in KERNEL_SETS.items():
    g = run_group(size, 8, targets, args.reps)
    out["kernels"].append({"kernels_per_block": label, **g})
    print(f"kernels {label}: " + ", ".join(f"{v} {g[v]['ratio_to_full']:.2f}" for v in g), flush=True)
  for t in seqs:
    g = run_group(dataclasses.replace(size, seq=t), 8, w1.TARGETS, args.reps)
    out["seq"].append({"seq": t, **g})
    print(f"seq {t}: " + ", ".join(f"{v} {g[v]['ratio_to_full']:.2f}" for v in g), flush=True)
  name = f"sweep_{jax.devices()[0].platform}"
  os.makedirs(w1.RESULTS, exist_ok=True)
  with open(os.path.join(w1.RESULTS, name + ".json"), "w") as f:
    json.dump(out, f, indent=1)
  write_table(out, os.path.join(w1.RESULTS, name + ".md"))
  plot(out, os.path.join(w1.RESULTS, name + ".png"))


def write_table(out, path):
  lines = ["# LoRA step / full fine-tuning step on W1 shapes\n",
           json.dumps(out["environment"]), ""]
  for key, label in (("rank", "rank"), ("kernels", "kernels_per_block"),
                     ("seq", "seq")):
    lines += [f"| {label} | " + " | ".join(VARIANTS) + " |",
              "|---|" + "---|" * len(VARIANTS)]
    for row in out[key]:
      lines.append(f"| {row[label]} | " + " | ".join(
          f"{row[v]['ratio_to_full']:.2f}" for v in VARIANTS) + " |")
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def plot(out, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, (key, label, log) in zip(axes, (("rank", "rank", True),
                                          ("kernels", "kernels_per_block", False),
                                          ("seq", "seq", True))):
    xs = [row[label] for row in out[key]]
    pos = xs if log else list(range(len(xs)))
    for v, style in (("merge", "s-"), ("factored", "o-"), ("auto", "x--")):
      ax.plot(pos, [row[v]["ratio_to_full"] for row in out[key]], style, label=v)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.axhline(0.70, color="tab:red", lw=0.8, ls=":", label="target 0.70")
    if log:
      ax.set_xscale("log", base=2)
    ax.set_xticks(pos, [str(x) for x in xs])
    ax.set_xlabel(label.replace("_", " "))
    ax.set_ylabel("step time / full fine-tuning")
    ax.set_title(f"W1, by {label.replace('_', ' ')}")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
