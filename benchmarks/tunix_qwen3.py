"""LoRA training steps on google/tunix's own Qwen3: lora_jax.nnx, the
functional lj.wrap step, google/qwix and full fine-tuning, side by side.

tunix 0.1.7's ``Qwen3`` (4 layers, d=256, ffn 1024, 8 query / 4 kv heads of
32, vocab 2048, float32), batch 8 x 128, LoRA rank 8, alpha 16 on
q/k/v/o/gate/up/down of every layer, Adam (lr 1e-4). Every NNX variant runs
the body of tunix's own train step (``PeftTrainer._train_step``: its default
next-token loss, ``nnx.value_and_grad`` with ``nnx.DiffState(0,
nnx.LoRAParam)`` when the model has LoRAParam leaves, the gradient's global
norm, ``nnx.Optimizer(wrt=nnx.LoRAParam)``'s update; ``wrt=nnx.Param`` and
plain ``argnums=0`` for full fine-tuning). Variants:

* ``full``: full fine-tuning of the plain model;
* ``lora_jax.nnx``: :func:`lora_jax.nnx.apply_lora` (factored engine);
* ``lj.wrap``: the functional step on the same model, base and factors:
  ``lj.wrap`` of the pure model, the same loss, grad norm and Adam on the
  delta (the bridge's target: <= 1.03x this);
* ``qwix``: ``qwix.apply_lora_to_model`` with a ``LoraProvider`` on the same
  seven projections;
* ``qlora_nf4 lora_jax.nnx`` / ``qlora_nf4 lj.wrap`` / ``qlora_nf4 qwix``:
  the seven projections' kernels in nf4 (blocks of 32 along the contracted
  axis; qwix: ``weight_qtype="nf4"``, ``tile_size=32``), the rest float32.
  A variant that fails to build or compile is reported with its error.

The jitted step of each variant takes exactly what its training loop holds:
the trained state (the factors or all weights, and the optimiser's state),
donated, and the frozen state (the base), read only; the NNX variants split
``(model, optimizer)`` with ``nnx.split`` and merge them again inside, as
``nnx.jit`` does. Variants run interleaved in one process after compilation;
the report gives median step times, compiled memory (arguments + temps from
``memory_analysis()``) and ratios to full fine-tuning in the same run. Writes
``benchmarks/results/tunix_qwen3_<platform>.json`` / ``.md``.

    python benchmarks/tunix_qwen3.py              # the size above
    python benchmarks/tunix_qwen3.py --size tiny  # a smoke run

Needs the ``tunix`` extra (``pip install -e '.[tunix]'`` and
``pip install --no-deps google-tunix==0.1.7``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

from flax import nnx
import jax
import jax.numpy as jnp
import optax
import qwix
from tunix.models.qwen3 import model as q3
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import w1

import lora_jax as lj
import lora_jax.nnx as ljn

SIZES = {
    "cpu": (dict(num_layers=4, vocab_size=2048, embed_dim=256, hidden_dim=1024,
                 num_heads=8, head_dim=32, num_kv_heads=4), 8, 128),
    "tiny": (dict(num_layers=2, vocab_size=128, embed_dim=64, hidden_dim=128,
                  num_heads=4, head_dim=16, num_kv_heads=2), 2, 16),
}
RANK, ALPHA, LR, BLOCK = 8, 16.0, 1e-4, 32
TARGETS = (r"layers/\d+/attn/(q_proj|k_proj|v_proj|o_proj)/w"
           r"|layers/\d+/mlp/(gate_proj|up_proj|down_proj)/kernel")
QWIX_PATH = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VARIANTS = ("full", "lora_jax.nnx", "lj.wrap", "qwix", "qlora_nf4 lora_jax.nnx",
            "qlora_nf4 lj.wrap", "qlora_nf4 qwix")


def model_inputs(tokens):
  """tunix's model inputs for an unpadded batch (what PeftTrainer's default
  loss takes)."""
  mask = jnp.ones_like(tokens, bool)
  return dict(input_tokens=tokens, input_mask=mask,
              positions=sft_utils.build_positions_from_mask(mask),
              attention_mask=sft_utils.make_causal_attn_mask(mask))


def tunix_step(model, tx):
  """``(step, trained, frozen)``: tunix's train step over ``model``, as a
  ``jax.jit`` of the split ``(model, optimizer)``."""
  trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(
      eval_every_n_steps=1_000_000, pbar_description=None))
  lora = sft_utils.is_lora_enabled(model)
  wrt = nnx.LoRAParam if lora else nnx.Param
  trained = nnx.Any(wrt, nnx.optimizer.OptState)
  graphdef, state, frozen = nnx.split((model, trainer.optimizer), trained, ...)

  def step(state, frozen, tokens):
    model, optimizer = nnx.merge(graphdef, state, frozen)
    loss, _, grad_norm = trainer._train_step(
        model, optimizer, model_inputs(tokens))
    return nnx.state((model, optimizer), trained), (loss, grad_norm)

  return jax.jit(step, donate_argnums=0), state, (frozen,)


def wrap_step(model, base, delta, tx):
  """The functional step: ``lj.wrap`` of the pure model, tunix's loss, the
  global norm, Adam on the delta; ``base`` frozen."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def f(p, tokens, positions, attention_mask):
    return nnx.merge(graphdef, p, rest)(tokens, positions, None,
                                         attention_mask)[0]

  wrapped = lj.wrap(f)

  def step(state, base, tokens):
    delta, opt = state

    def loss(d):
      m = lambda t, pos, _, mask: (wrapped(base, d, t, pos, mask), None)
      return peft_trainer._default_loss_fn(m, **model_inputs(tokens))

    value, g = jax.value_and_grad(loss)(delta)
    grad_norm = optax.global_norm(g)
    updates, opt = tx.update(g, opt, delta)
    return (optax.apply_updates(delta, updates), opt), (value, grad_norm)

  own = jax.tree.map(jnp.copy, delta)
  return jax.jit(step, donate_argnums=0), (own, tx.init(own)), (base,)


def build(size):
  shape, batch, seq = SIZES[size]
  config = q3.ModelConfig(**shape, rope_theta=1_000_000, norm_eps=1e-6)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0,
                              config.vocab_size)
  return config, tokens


def make_variants(config, tokens, variants):
  """``{name: () -> (step, state, frozen)}``, built lazily (a variant that
  fails is reported, the others run)."""
  tx = optax.adam(LR)
  inputs = model_inputs(tokens)
  example = (tokens[:1], inputs["positions"][:1], None,
             inputs["attention_mask"][:1])
  lcfg = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
  block = min(BLOCK, config.head_dim)
  model = lambda: q3.Qwen3(config, rngs=nnx.Rngs(0))

  def quantized(m, delta):
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    q = lj.quantize(params, "nf4", block_size=block, targets=delta)
    return nnx.merge(graphdef, q, rest)

  def bridge(nf4=False):
    m = model()
    if nf4:
      delta = ljn.get_delta(ljn.apply_lora(m, lcfg, jax.random.key(2), *example))
      m = quantized(m, delta)
    return ljn.apply_lora(m, lcfg, jax.random.key(2), *example)

  def functional(nf4=False):
    m = bridge(nf4)  # the same base and factors as the bridge's
    base = nnx.split(m.base_model, nnx.Param, ...)[1]
    return wrap_step(m.base_model, base, ljn.get_delta(m), tx)

  def with_qwix(nf4=False):
    kw = dict(weight_qtype="nf4", tile_size=block) if nf4 else {}
    provider = qwix.LoraProvider(module_path=QWIX_PATH, rank=RANK,
                                 alpha=ALPHA, **kw)
    return tunix_step(qwix.apply_lora_to_model(
        model(), provider, *example, rngs=nnx.Rngs(2)), tx)

  table = {
      "full": lambda: tunix_step(model(), tx),
      "lora_jax.nnx": lambda: tunix_step(bridge(), tx),
      "lj.wrap": functional,
      "qwix": with_qwix,
      "qlora_nf4 lora_jax.nnx": lambda: tunix_step(bridge(True), tx),
      "qlora_nf4 lj.wrap": lambda: functional(True),
      "qlora_nf4 qwix": lambda: with_qwix(True),
  }
  return {v: table[v] for v in variants}


def measure(builders, tokens, reps):
  """Builds and compiles each variant, then times them interleaved."""
  out, compiled, errors = {}, {}, {}
  for name, make in builders.items():
    t0 = time.perf_counter()
    try:
      fn, state, frozen = make()
      exe = fn.lower(state, *frozen, tokens).compile()
      compile_s = time.perf_counter() - t0
      state, (loss, grad_norm) = exe(state, *frozen, tokens)  # warm up
      jax.block_until_ready(loss)
    except Exception as e:
      # reported in the results (qwix's QLoRA), never silently dropped
      errors[name] = f"{type(e).__name__}: {e}"[:600]
      traceback.print_exc()
      print(f"{name}: FAILED {errors[name]}", flush=True)
      continue
    cost = exe.cost_analysis()  # XLA's count for the compiled program
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    out[name] = {"compile_s": compile_s, **w1.memory_stats(exe),
                 "flops": cost.get("flops"),
                 "bytes_accessed": cost.get("bytes accessed"),
                 "loss": float(loss), "grad_norm": float(grad_norm),
                 "trained_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
                 "frozen_bytes": sum(x.nbytes for x in jax.tree.leaves(frozen))}
    compiled[name] = [exe, state, frozen]
    print(f"{name}: compiled in {compile_s:.1f} s, loss {float(loss):.4f}",
          flush=True)
  times = {name: [] for name in compiled}
  names = list(compiled)
  for rep in range(reps):
    for name in (names if rep % 2 == 0 else names[::-1]):  # A B C, C B A
      cell = compiled[name]
      exe, state, frozen = cell
      t0 = time.perf_counter()
      state, (loss, _) = exe(state, *frozen, tokens)
      jax.block_until_ready((state, loss))
      times[name].append(time.perf_counter() - t0)
      cell[1] = state
  for name in names:
    out[name]["step_ms"] = 1e3 * statistics.median(times[name])
    out[name]["step_ms_all"] = [round(1e3 * t, 3) for t in times[name]]
  return out, errors


def versions():
  names = ("jax", "jaxlib", "flax", "optax", "google-tunix", "qwix")
  out = {n: md.version(n) for n in names}
  # lora_jax as run: the checkout's commit, and whether its lora_jax/ differs
  here = os.path.dirname(os.path.dirname(os.path.abspath(lj.__file__)))
  git = lambda *a: subprocess.run(("git", "-C", here, *a), capture_output=True,
                                  text=True, check=False).stdout.strip()
  commit = git("rev-parse", "--short", "HEAD")
  if commit:
    dirty = git("status", "--porcelain", "--", "lora_jax")
    out["lora_jax"] = commit + (" + uncommitted changes in lora_jax/" if dirty else "")
  else:
    out["lora_jax"] = md.version("lora_jax")
  return out


def targets_line(results):
  r = results
  parts = []
  if "full" in r and "lora_jax.nnx" in r:
    parts.append(f"lora_jax.nnx step / full {r['lora_jax.nnx']['step_ms'] / r['full']['step_ms']:.2f} "
                 f"(target <= 0.60)")
    if "memory_bytes" in r["full"]:
      parts.append(f"memory / full {r['lora_jax.nnx']['memory_bytes'] / r['full']['memory_bytes']:.2f} "
                   f"(target <= 0.70)")
  for pre in ("", "qlora_nf4 "):
    b, f = r.get(f"{pre}lora_jax.nnx"), r.get(f"{pre}lj.wrap")
    if b and f:
      parts.append(f"{pre}bridge / functional: step {b['step_ms'] / f['step_ms']:.3f} "
                   f"(target <= 1.03), memory {b['memory_bytes'] / f['memory_bytes']:.3f}, "
                   f"XLA flops {b['flops']:.4g} / {f['flops']:.4g}, bytes accessed "
                   f"{b['bytes_accessed']:.4g} / {f['bytes_accessed']:.4g}")
  return "; ".join(parts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--name", default=None, help="results file stem")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  load_before = os.getloadavg()
  config, tokens = build(args.size)
  builders = make_variants(config, tokens, args.variants.split(","))
  results, errors = measure(builders, tokens, args.reps)
  shape, batch, seq = SIZES[args.size]
  n_params = sum(x.size for x in jax.tree.leaves(
      nnx.state(q3.Qwen3(config, rngs=nnx.Rngs(0)), nnx.Param)))
  report = {"size": args.size, "model": shape, "batch": [batch, seq],
            "params": n_params, "rank": RANK, "alpha": ALPHA, "lr": LR,
            "nf4_block": BLOCK, "targets": TARGETS, "qwix_module_path": QWIX_PATH,
            "reps": args.reps, "versions": versions(),
            "environment": {**w1.environment(), "load_avg_before": load_before,
                            "load_avg_after": os.getloadavg()},
            "results": results, "errors": errors,
            "targets_line": targets_line(results),
            "wall_s": time.perf_counter() - t0}
  name = args.name or f"tunix_qwen3_{jax.devices()[0].platform}"
  if args.size != "cpu" and not args.name:
    name += f"_{args.size}"
  failed = "".join(f"\n- `{n}` failed: `{e.splitlines()[0]}`"
                   for n, e in errors.items())
  md_text = (
      f"# {name}\n\n{json.dumps(report['environment'])}\n\n"
      f"versions: {json.dumps(report['versions'])}\n\n"
      f"tunix's own Qwen3 (`tunix.models.qwen3.model.Qwen3`), "
      f"{shape['num_layers']} layers, d={shape['embed_dim']}, ffn "
      f"{shape['hidden_dim']}, heads {shape['num_heads']}/{shape['num_kv_heads']}"
      f"x{shape['head_dim']}, vocab {shape['vocab_size']}, "
      f"{n_params / 1e6:.1f} M parameters, float32; batch {batch} x {seq}; "
      f"LoRA rank {RANK} on q/k/v/o/gate/up/down; Adam; tunix's train step "
      f"(PeftTrainer._train_step) for the NNX variants; medians of "
      f"{args.reps} interleaved reps. `python benchmarks/tunix_qwen3.py "
      f"--size {args.size}`\n\n" + w1.table(results) + "\n\n"
      + w1.peak_note(results) + "\n\n" + targets_line(results) + "\n"
      + failed + "\n")
  w1.save_results(name, report, md_text)
  print(md_text)
  return report


if __name__ == "__main__":
  main()
