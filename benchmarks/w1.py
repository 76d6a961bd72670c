"""Reference workload W1 (benchmarks/README.md): a GPT-style decoder, LoRA vs full.

Runs every variant interleaved in one process, after compilation, and reports
median step time, ratio to full fine-tuning, compile time and compiled memory
(argument + temp bytes). Each variant's jitted step takes exactly what its
training loop holds (full fine-tuning: params + optimiser state, no frozen
copy; LoRA: base + delta + the delta's optimiser state), so the compiled
argument bytes are honest by construction. (Earlier every step also took the
frozen base; ``jax.jit`` drops unused arguments from the executable, so the
full step's compiled figures were the same, but the accounting no longer
depends on that.) Training states are donated, so args + temp is each step's
peak footprint (the outputs alias the state); the JSON also records output,
alias and peak bytes. Writes ``benchmarks/results/<name>.json`` and
``.md``.

    python benchmarks/w1.py                 # W1 on this machine
    python benchmarks/w1.py --size gpu      # the accelerator size (bf16 base)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Size:
  vocab: int = 4096
  d_model: int = 512
  layers: int = 4
  heads: int = 8
  mlp: int = 2048
  batch: int = 8
  seq: int = 128
  dtype: str = "float32"  # of the base parameters and activations


SIZES = {
    "w1": Size(),
    "gpu": Size(d_model=1024, layers=8, heads=16, mlp=4096, batch=16, seq=512,
                dtype="bfloat16"),
    "tiny": Size(vocab=256, d_model=64, layers=2, heads=4, mlp=256, batch=2,
                 seq=16),
}


class Block(nn.Module):
  size: Size

  @nn.compact
  def __call__(self, x):
    s = self.size
    dt = jnp.dtype(s.dtype)
    dense = lambda n, name: nn.Dense(n, name=name, dtype=dt, param_dtype=dt)
    h = nn.LayerNorm(dtype=dt, param_dtype=dt)(x)
    b, t, _ = h.shape
    split = lambda y: y.reshape(b, t, s.heads, s.d_model // s.heads)
    q, k, v = (split(dense(s.d_model, n)(h)) for n in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(dt)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, jnp.finfo(dt).min)
    att = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dt)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, s.d_model)
    x = x + dense(s.d_model, "o")(o)
    h = nn.LayerNorm(dtype=dt, param_dtype=dt)(x)
    h = dense(s.d_model, "fc2")(nn.gelu(dense(s.mlp, "fc1")(h)))
    return x + h


class FlaxBlock(nn.Module):
  """The same block from Flax's own layers: MultiHeadDotProductAttention
  (DenseGeneral q/k/v/out kernels of shape (512, 8, 64) / (8, 64, 512))."""
  size: Size

  @nn.compact
  def __call__(self, x, _=None):
    s = self.size
    dt = jnp.dtype(s.dtype)
    h = nn.LayerNorm(dtype=dt, param_dtype=dt)(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=s.heads, dtype=dt, param_dtype=dt, name="attn")(h, mask=mask)
    h = nn.LayerNorm(dtype=dt, param_dtype=dt)(x)
    h = nn.Dense(s.d_model, dtype=dt, param_dtype=dt, name="fc2")(
        nn.gelu(nn.Dense(s.mlp, dtype=dt, param_dtype=dt, name="fc1")(h)))
    return x + h, None


class Decoder(nn.Module):
  size: Size
  arch: str = "w1"  # "w1": benchmarks/README.md's W1 model; "flax_scan": FlaxBlock under nn.scan

  @nn.compact
  def __call__(self, tokens):
    s = self.size
    dt = jnp.dtype(s.dtype)
    x = nn.Embed(s.vocab, s.d_model, dtype=dt, param_dtype=dt)(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (s.seq, s.d_model), dt)
    x = x + pos[None, :tokens.shape[1]]
    if self.arch == "flax_scan":
      stack = nn.scan(FlaxBlock, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=s.layers)
      x, _ = stack(s, name="blocks")(x, None)
    else:
      for i in range(s.layers):
        x = Block(s, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=dt, param_dtype=dt)(x)
    return nn.Dense(s.vocab, dtype=dt, param_dtype=dt, name="head")(x)


TARGETS = r".*/(q|k|v|o|fc1|fc2)/kernel"
ARCH_TARGETS = {"w1": TARGETS,
                "flax_scan": r".*/(query|key|value|out|fc1|fc2)/kernel"}


def setup(size: Size, rank: int = 8, targets: str | None = None, seed: int = 0,
          arch: str = "w1", **config):
  model = Decoder(size, arch)
  targets = targets or ARCH_TARGETS[arch]
  tokens = jax.random.randint(jax.random.key(seed), (size.batch, size.seq), 0,
                              size.vocab)
  params = model.init(jax.random.key(seed + 1), tokens)["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  config = lj.LoraConfig(rank=rank, alpha=16.0, targets=targets, **config)
  base, delta = lj.split(params, config, jax.random.key(seed + 2),
                         apply_fn=apply, example_args=(tokens,))
  return apply, params, base, delta, tokens


def cross_entropy(logits, tokens):
  logits = logits[:, :-1].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def make_steps(apply, params, base, delta, tokens, variants,
               variant_setup=None):
  """``{name: (jitted step, state, frozen)}``, called as
  ``step(state, *frozen, tokens) -> (state, loss)``.

  Each step's arguments are exactly what its training loop holds, nothing
  more (benchmarks/README.md, "Memory is counted honestly"): ``state`` is what the step updates (and
  donates), ``frozen`` what it only reads. Full fine-tuning: params + Adam
  state, nothing frozen. LoRA: delta + its Adam state (+ a PRNG key with
  dropout), the base frozen.
  Floor: the position table + its Adam state, the other params frozen.
  Forward: the params, frozen.
  """
  tx = optax.adam(1e-4)
  loss = lambda p, x: cross_entropy(apply(p, x), x)
  steps: dict[str, tuple[Callable, Any, tuple]] = {}

  def lora_step(mode, delta=delta, dropout=False, recompute=True):
    wrapped = lj.wrap(apply, mode, recompute=recompute)

    def step(state, base, x):
      if dropout:  # only a dropout loop holds a PRNG key
        d, opt, key = state
        key, sub = jax.random.split(key)
        kw = {"lora_rng": sub}
      else:
        d, opt = state
        kw = {}
      l, g = jax.value_and_grad(
          lambda d: cross_entropy(wrapped(base, d, x, **kw), x))(d)
      u, opt = tx.update(g, opt, d)
      new = (optax.apply_updates(d, u), opt)
      return (new + (key,) if dropout else new), l
    own = jax.tree.map(jnp.copy, delta)  # each variant donates its own state
    state = (own, tx.init(own))
    if dropout:
      state += (jax.random.key(0),)
    return jax.jit(step, donate_argnums=0), state, (base,)

  def full_step(state, x):
    p, opt = state
    l, g = jax.value_and_grad(loss)(p, x)
    u, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, u), opt), l

  def floor_step(state, rest, x):
    # gradient w.r.t. the position table only: backward through every layer,
    # no weight gradient (the lower bound for any LoRA step)
    pos, opt = state
    l, g = jax.value_and_grad(lambda pos: loss({**rest, "pos": pos}, x))(pos)
    u, opt = tx.update(g, opt, pos)
    return (optax.apply_updates(pos, u), opt), l

  def forward(state, params, x):
    return state, loss(params, x)

  for v in variants:
    if v == "forward":
      steps[v] = (jax.jit(forward), (), (base,))
    elif v == "merged_forward":
      # inference after lj.merge: the merged params are what the loop holds
      merged = lj.merge(base, jax.tree.map(jnp.copy, delta))
      steps[v] = (jax.jit(forward), (), (merged,))
    elif v == "floor":
      pos = jnp.copy(params["pos"])
      rest = {k: x for k, x in params.items() if k != "pos"}
      steps[v] = (jax.jit(floor_step, donate_argnums=0), (pos, tx.init(pos)),
                  (rest,))
    elif v == "full":
      full_params = jax.tree.map(jnp.copy, params)
      steps[v] = (jax.jit(full_step, donate_argnums=0),
                  (full_params, tx.init(full_params)), ())
    elif v == "factored[recompute=False]":
      # without recomputing adapters' inputs in the backward pass
      steps[v] = lora_step("factored", recompute=False)
    elif v in ("dora", "dropout"):
      # the same model and kernels, split with DoRA / LoRA dropout 0.1
      cfg = {"dora": True} if v == "dora" else {"dropout": 0.1}
      _, _, _, d, _ = variant_setup(**cfg)
      steps[v] = lora_step("factored", d, dropout=v == "dropout")
    else:
      steps[v] = lora_step(v)
  return steps


def memory_stats(exe) -> dict:
  """A compiled step's memory (bytes): arguments, temps, their sum, and what
  it holds at its peak; empty where the backend reports none."""
  mem = exe.memory_analysis()
  if mem is None:
    return {}
  args, temp = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
  out, alias = int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
  # At its peak a step holds its arguments, temps and outputs, less the
  # outputs written into donated arguments: args + temp when the state is
  # donated (the outputs alias it) and the rest is a scalar.
  return {"argument_bytes": args, "temp_bytes": temp,
          "memory_bytes": args + temp, "output_bytes": out,
          "alias_bytes": alias, "peak_bytes": args + temp + out - alias}


def measure(steps, base, tokens, reps: int, inner: int = 1):
  """Compiles each step, then times them interleaved; returns stats.

  ``steps`` as :func:`make_steps` returns; ``base`` is not used (each step
  carries what it reads) and stays for callers of the older signature.
  """
  del base
  out = {}
  compiled = {}
  for name, (fn, state, frozen) in steps.items():
    t0 = time.perf_counter()
    lowered = fn.lower(state, *frozen, tokens)
    exe = lowered.compile()
    out[name] = {"compile_s": time.perf_counter() - t0}
    out[name].update(memory_stats(exe))
    state, loss = exe(state, *frozen, tokens)  # warm up
    jax.block_until_ready(loss)
    compiled[name] = [exe, state, frozen]
    out[name]["loss"] = float(loss)
  times = {name: [] for name in steps}
  names = list(compiled)
  for rep in range(reps):
    # A B C, then C B A: no variant always runs right after the same one.
    for name in (names if rep % 2 == 0 else names[::-1]):
      cell = compiled[name]
      exe, state, frozen = cell
      t0 = time.perf_counter()
      for _ in range(inner):
        state, loss = exe(state, *frozen, tokens)
      jax.block_until_ready((state, loss))
      times[name].append((time.perf_counter() - t0) / inner)
      cell[1] = state
  for name in steps:
    out[name]["step_ms"] = 1e3 * statistics.median(times[name])
    out[name]["step_ms_all"] = [round(1e3 * t, 3) for t in times[name]]
  return out


def environment() -> dict:
  dev = jax.devices()[0]
  return {"jax": jax.__version__, "device": dev.device_kind,
          "platform": dev.platform, "cpu_count": os.cpu_count(),
          "python": platform.python_version(),
          "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_results(name: str, report: dict, md: str) -> None:
  """Writes ``results/<name>.json`` (the report) and ``results/<name>.md``."""
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
    f.write(md)


def table(results: dict, baseline: str = "full") -> str:
  if baseline not in results:
    baseline = next(iter(results))
  base_ms = results[baseline]["step_ms"]
  base_mem = results[baseline].get("memory_bytes")
  base_compile = results[baseline]["compile_s"]
  rows = [f"| variant | step (ms, median) | / {baseline} | compile (s) | / "
          f"{baseline} | args (MiB) | temp (MiB) | memory (MiB, arg+temp) | / "
          f"{baseline} |", "|---|---|---|---|---|---|---|---|---|"]
  mib = lambda r, k: f"{r[k] / 2**20:.1f}" if k in r else "n/a"
  for name, r in results.items():
    mem = r.get("memory_bytes")
    mem_r = f"{mem / base_mem:.2f}" if mem and base_mem else "n/a"
    rows.append(f"| {name} | {r['step_ms']:.1f} | {r['step_ms'] / base_ms:.2f} | "
                f"{r['compile_s']:.2f} | {r['compile_s'] / base_compile:.2f} | "
                f"{mib(r, 'argument_bytes')} | {mib(r, 'temp_bytes')} | "
                f"{mib(r, 'memory_bytes')} | {mem_r} |")
  return "\n".join(rows)


def peak_note(results: dict) -> str:
  """A line on where args + temp differs from the step's peak footprint."""
  off = {n: r["peak_bytes"] - r["memory_bytes"] for n, r in results.items()
         if "peak_bytes" in r and r["peak_bytes"] - r["memory_bytes"] > 2**20}
  if not off:
    return ("args + temp is each step's peak footprint (training states are "
            "donated: the outputs alias them).")
  return "peak = args + temp + non-donated outputs: " + ", ".join(
      f"{n} +{b / 2**20:.1f} MiB" for n, b in off.items())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(SIZES), default="w1")
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--arch", choices=sorted(ARCH_TARGETS), default="w1",
                  help="w1: benchmarks/README.md's W1 model; flax_scan: Flax attention "
                       "(DenseGeneral kernels) with blocks under nn.scan")
  ap.add_argument("--seq", type=int, default=None, help="override sequence length")
  ap.add_argument("--variants", default="forward,merged_forward,floor,full,merge,"
                  "factored,factored[recompute=False],auto,dora,dropout")
  ap.add_argument("--name", default=None, help="results file stem")
  args = ap.parse_args(argv)
  size = SIZES[args.size]
  if args.seq:
    size = dataclasses.replace(size, seq=args.seq)
  variants = args.variants.split(",")
  apply, params, base, delta, tokens = setup(size, rank=args.rank, arch=args.arch)
  variant_setup = lambda **cfg: setup(size, rank=args.rank, arch=args.arch, **cfg)
  steps = make_steps(apply, params, base, delta, tokens, variants, variant_setup)
  results = measure(steps, base, tokens, args.reps)
  for r in results.values():
    r["ratio_to_full"] = r["step_ms"] / results["full"]["step_ms"] if "full" in results else None
  if "merged_forward" in results and "forward" in results:
    results["merged_forward"]["ratio_to_forward"] = (
        results["merged_forward"]["step_ms"] / results["forward"]["step_ms"])
  name = args.name or "_".join(
      [args.size] + ([args.arch] if args.arch != "w1" else [])
      + ([f"seq{args.seq}"] if args.seq else []) + [jax.devices()[0].platform])
  report = {"workload": dataclasses.asdict(size), "arch": args.arch,
            "rank": args.rank, "alpha": 16.0, "targets": ARCH_TARGETS[args.arch],
            "reps": args.reps,
            "environment": environment(), "results": results}
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = table(results) + "\n\n" + peak_note(results)
  if "merged_forward" in results and "forward" in results:
    md += (f"\n\nmerged inference / base forward: "
           f"{results['merged_forward']['ratio_to_forward']:.3f}")
  for v in ("dora", "dropout"):
    if v in results and "factored" in results:
      r = results[v]["step_ms"] / results["factored"]["step_ms"]
      results[v]["overhead_over_factored"] = r - 1
      md += f"\n\n{v} step / plain LoRA (factored) step: {r:.3f}"
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
    f.write(f"# {name}\n\n{json.dumps(report['environment'])}\n\n{md}\n")
  print(md)
  return report


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
