"""The demo: pretrain a tiny transformer, then teach it a new task with LoRA.

A two-block decoder-only transformer (Flax Linen) learns to *copy* a sequence
of digits (task 1, all parameters trained), then learns to *reverse* it (task
2) with LoRA on every attention and MLP kernel while the base stays frozen.
The demo prints held-out accuracy before and after, what is trainable, the
step time of full fine-tuning against LoRA, and the adapter's size on disk;
then it reloads the adapter, merges it into the base and checks that the
merged model predicts what the wrapped one does: bit for bit against wrap's
merge engine, to float32 rounding against the engine used in training.

Run it with ``python -m lora_jax demo`` (or ``lora-jax-demo``); ``--help``
lists the flags. The data is generated locally; with the default flags it
runs in under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Callable, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import lora_jax as lj

NUM_DIGITS = 10        # tokens 0..9 are digits
SEP = NUM_DIGITS       # separator token between question and answer
VOCAB = NUM_DIGITS + 1
LENGTH = 8             # digits per question
TASKS = {"copy": lambda x: x, "reverse": lambda x: x[:, ::-1]}
TARGETS = r".*/(query|key|value|out|fc1|fc2)/kernel"
LORA_LR = 5e-3


# --- model ------------------------------------------------------------------

class Block(nn.Module):
  """Pre-norm block: causal multi-head attention, then a GELU MLP."""
  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    split_heads = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    h = nn.LayerNorm()(x)
    q, k, v = (split_heads(nn.Dense(d, name=n)(h))
               for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), v)
    x = x + nn.Dense(d, name="out")(att.reshape(b, t, d))
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(4 * d, name="fc1")(h)))


class TinyGPT(nn.Module):
  """Token embedding + learned positions, ``blocks`` blocks, a Dense head."""
  d_model: int = 128
  heads: int = 4
  blocks: int = 2
  max_len: int = 2 * LENGTH

  @nn.compact
  def __call__(self, ids):
    pos = self.param("pos", nn.initializers.normal(0.02),
                     (self.max_len, self.d_model))
    x = nn.Embed(VOCAB, self.d_model, name="tok")(ids) + pos[:ids.shape[1]]
    for i in range(self.blocks):
      x = Block(self.d_model, self.heads, name=f"block{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


# --- data -------------------------------------------------------------------

def make_batch(task: str, rng: np.random.Generator, n: int):
  """``n`` sequences ``digits SEP answer``; returns (inputs, next tokens).

  The answer starts at input position ``LENGTH`` (the SEP), so the loss and
  accuracy count positions ``LENGTH..2*LENGTH-1`` only (see ``ANSWER``).
  """
  x = rng.integers(0, NUM_DIGITS, (n, LENGTH))
  seq = np.concatenate([x, np.full((n, 1), SEP), TASKS[task](x)], axis=1)
  return seq[:, :-1], seq[:, 1:]


ANSWER = (np.arange(2 * LENGTH) >= LENGTH).astype(np.float32)


def loss_and_accuracy(logits, targets):
  """Mean cross-entropy and accuracy over answer tokens only."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  hit = (logits.argmax(-1) == targets).astype(jnp.float32)
  count = ANSWER.sum() * targets.shape[0]
  return (ce * ANSWER).sum() / count, (hit * ANSWER).sum() / count


# --- progress bar -----------------------------------------------------------

class Progress:
  """A tiny progress bar on stderr.

  On a terminal it redraws one line in place (``'\\r'``) at most ten times a
  second; otherwise (a log file, CI) it prints a plain line at every tenth of
  the run, so logs stay short.
  """

  def __init__(self, total: int, desc: str, enabled: bool = True,
               stream: TextIO | None = None):
    self.total, self.desc, self.enabled = total, desc, enabled
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.every = max(1, total // 10)
    self.start = self.last = None
    self.drawn = 0  # length of the line on screen, to blank a longer one

  def update(self, step: int, loss: Callable[[], float]):
    """Reports ``step`` (1-based); ``loss`` is called only when drawing."""
    if not self.enabled:
      return
    now = time.perf_counter()
    if self.start is None:
      self.start = self.last = now  # the first step compiles: rate from here
    done = step == self.total
    if self.tty and not done and now - self.last < 0.1:
      return
    if not self.tty and not done and step % self.every:
      return
    self.last = now
    rate = (step - 1) / (now - self.start) if now > self.start else 0.0
    width = 24
    bar = "#" * (width * step // self.total)
    line = (f"{self.desc} [{bar:<{width}}] {step}/{self.total} "
            f"loss {loss():.4f} {rate:.1f} it/s")
    if self.tty:
      pad = " " * max(0, self.drawn - len(line))
      self.drawn = len(line)
      self.stream.write("\r" + line + pad + ("\n" if done else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()


# --- training ---------------------------------------------------------------

def train(step_fn, state, consts, task, steps, batch, rng, progress):
  """Runs ``*state, loss = step_fn(*state, *consts, x, y)`` on fresh batches.

  Returns the final state.
  """
  for i in range(1, steps + 1):
    *state, loss = step_fn(*state, *consts, *make_batch(task, rng, batch))
    progress.update(i, lambda: float(loss))
  return state


def interleaved_ms(*fns: Callable[[], Any], rounds: int = 20) -> list[float]:
  """Median time in ms of each (compiled) function, called in turn.

  Running A B A B ... rather than all A then all B makes a busy, shared
  machine slow them alike, so their ratio holds.
  """
  times = [[] for _ in fns]
  for _ in range(rounds):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
  return [1e3 * statistics.median(ts) for ts in times]


def plot_curves(curves: dict[str, list[float]], path: str) -> str | None:
  """Writes the training-loss curves to a PNG; None without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, curve in curves.items():
    ax.plot(np.arange(1, len(curve) + 1), curve, label=name, lw=1.2)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (answer tokens)")
  ax.set_title("task 2 'reverse' from the model pretrained on 'copy'")
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.abspath(path)


def dir_bytes(path: str) -> int:
  """Sum of the sizes of all files under ``path``."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def max_abs(x) -> float:
  return float(jnp.abs(x).max())


def same_bits(a, b) -> bool:
  """Whether two arrays have the same shape, dtype and bytes."""
  a, b = np.asarray(a), np.asarray(b)
  return (a.shape, a.dtype, a.tobytes()) == (b.shape, b.dtype, b.tobytes())


def flat_arrays(tree) -> dict[str, Any]:
  """``{key path: array}`` for the array leaves of ``tree`` (None dropped)."""
  return {jax.tree_util.keystr(k): x
          for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- the demo ---------------------------------------------------------------

def parse_args(argv=None, prog=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=prog, description=(
          "Pretrain a tiny transformer to copy digit sequences, then teach it "
          "to reverse them with LoRA (base frozen). Prints accuracy before "
          "and after, trainable share, step times and adapter size, and "
          "checks that the reloaded, merged adapter predicts like the "
          "wrapped one. Exits 1 if that check fails."))
  p.add_argument("--steps-pretrain", type=int, default=300, metavar="N",
                 help="full-training steps on task 1, copy (%(default)s)")
  p.add_argument("--steps-lora", type=int, default=500, metavar="N",
                 help="LoRA steps on task 2, reverse (%(default)s)")
  p.add_argument("--rank", type=int, default=4,
                 help="LoRA rank r (%(default)s)")
  p.add_argument("--alpha", type=float, default=8.0,
                 help="LoRA alpha; updates are scaled by alpha / r "
                 "(%(default)s)")
  p.add_argument("--targets", default=TARGETS, metavar="REGEX",
                 help="kernels to adapt, a regex on '/'-joined parameter "
                 "paths (default: every attention and MLP kernel)")
  p.add_argument("--width", type=int, default=128, metavar="D",
                 help="the transformer's d_model (%(default)s)")
  p.add_argument("--batch", type=int, default=128,
                 help="sequences per step (%(default)s)")
  p.add_argument("--out", default="demo_out", metavar="DIR",
                 help="DIR/adapter (the LoRA adapter), DIR/full (the fully "
                 "fine-tuned params, for comparison) and DIR/loss_curves.png "
                 "are written there, replacing old ones (%(default)s)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of init and training data; the held-out sets use "
                 "seed + 1 (%(default)s)")
  p.add_argument("--quiet", action="store_true",
                 help="print nothing (no report, no progress bar)")
  args = p.parse_args(argv)
  if min(args.steps_pretrain, args.steps_lora, args.rank, args.batch) < 1:
    p.error("--steps-pretrain, --steps-lora, --rank and --batch must be >= 1")
  return args


def main(argv=None, prog=None) -> dict[str, Any]:
  """Runs the demo; returns its key numbers (see the end of this function).

  ``argv`` defaults to ``sys.argv[1:]``. The command-line entry point is
  :func:`cli`, which prints and turns the result into an exit status.
  """
  args = parse_args(argv, prog)
  say = ((lambda *a: None) if args.quiet
         else functools.partial(print, flush=True))
  train_rng = np.random.default_rng(args.seed)
  test_rng = np.random.default_rng(args.seed + 1)
  test = {t: make_batch(t, test_rng, 1000) for t in TASKS}

  model = TinyGPT(d_model=args.width)
  fn = lambda p, x: model.apply({"params": p}, x)
  params = model.init(jax.random.key(args.seed), test["copy"][0][:1])["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  say(f"lora_jax demo: decoder-only transformer, {model.blocks} blocks, "
      f"d_model {model.d_model}, {model.heads} heads, {n_params:,} parameters")
  say("task 1 'copy':    3 1 4 1 5 9 2 6 | -> 3 1 4 1 5 9 2 6\n"
      "task 2 'reverse': 3 1 4 1 5 9 2 6 | -> 6 2 9 5 1 4 1 3\n")

  def full_step_for(tx):
    """A jitted step that trains every parameter with ``tx``."""
    @jax.jit
    def step(params, opt_state, x, y):
      loss, g = jax.value_and_grad(
          lambda p: loss_and_accuracy(fn(p, x), y)[0])(params)
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return step

  # 1. Pretrain every parameter on task 1.
  tx = optax.adam(3e-3)
  full_step = full_step_for(tx)

  evaluate = jax.jit(lambda p, x, y: loss_and_accuracy(fn(p, x), y))
  say(f"[1] pretraining all parameters on 'copy' ({args.steps_pretrain} "
      f"steps, batch {args.batch}, adam 3e-3)")
  bar = Progress(args.steps_pretrain, "pretrain", not args.quiet)
  params, _ = train(
      full_step, (params, tx.init(params)), (), "copy", args.steps_pretrain,
      args.batch, train_rng, bar)
  t1_loss, t1_acc = map(float, evaluate(params, *test["copy"]))
  t2_loss0, t2_acc0 = map(float, evaluate(params, *test["reverse"]))
  say(f"    held-out 'copy':    loss {t1_loss:7.4f}  accuracy {t1_acc:6.1%}")
  say(f"    held-out 'reverse': loss {t2_loss0:7.4f}  accuracy {t2_acc0:6.1%}"
      f"  (before LoRA)\n")

  # 2. Task 2 three ways, from the same pretrained model and the same data:
  #    LoRA with each engine (base frozen, delta trained) and full fine-tuning.
  cfg = lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
  base, delta0 = lj.split(params, cfg, jax.random.key(args.seed + 1),
                          apply_fn=fn, example_args=(test["copy"][0][:1],))
  n_lora = sum(x.size for x in jax.tree.leaves(delta0))
  say(f"[2] 'reverse' three ways, {args.steps_lora} steps each, same data: "
      f"LoRA (factored engine), LoRA (merge engine), full fine-tuning")
  say(f"    LoRA rank {cfg.rank}, alpha {cfg.alpha:g} (scale {cfg.scale:g}) "
      f"on {args.targets}; adam {LORA_LR:g} for LoRA, 1e-3 for full")
  say("    " + lj.summary(base, delta0).replace("\n", "\n    "))
  lora_tx = optax.adam(LORA_LR)

  def lora_step_for(mode):
    apply = lj.wrap(fn, mode)

    @jax.jit
    def step(delta, opt_state, base, x, y):
      loss, g = jax.value_and_grad(
          lambda d: loss_and_accuracy(apply(base, d, x), y)[0])(delta)
      updates, opt_state = lora_tx.update(g, opt_state, delta)
      return optax.apply_updates(delta, updates), opt_state, loss
    return apply, step

  full_tx = optax.adam(1e-3)
  full_ft_step = full_step_for(full_tx)

  runs = {}
  for name in ("LoRA factored", "LoRA merge", "full fine-tuning"):
    rng = np.random.default_rng(args.seed + 7)  # the same batches for all
    curve = []
    bar = Progress(args.steps_lora, f"{name:<16}", not args.quiet)

    def track(i, loss, curve=curve, bar=bar):
      curve.append(loss)
      bar.update(i, lambda: float(loss))
    if name == "full fine-tuning":
      state = (jax.tree.map(jnp.copy, params), None)
      state = (state[0], full_tx.init(state[0]))
      step, consts = full_ft_step, ()
    else:
      apply, step = lora_step_for("factored" if "factored" in name else "merge")
      state, consts = (delta0, lora_tx.init(delta0)), (base,)
    for i in range(1, args.steps_lora + 1):
      *state, loss = step(*state, *consts, *make_batch("reverse", rng, args.batch))
      track(i, loss)
    runs[name] = {"state": state, "step": step, "consts": consts,
                  "curve": [float(l) for l in curve]}
    if name == "full fine-tuning":
      runs[name]["eval"] = lambda st=state: evaluate(st[0], *test["reverse"])
    else:
      lora_eval = jax.jit(lambda b, d, x, y, apply=apply:
                          loss_and_accuracy(apply(b, d, x), y))
      runs[name]["eval"] = lambda st=state, ev=lora_eval: ev(base, st[0],
                                                             *test["reverse"])
  for r in runs.values():
    r["loss"], r["accuracy"] = map(float, r["eval"]())
  delta = runs["LoRA factored"]["state"][0]
  t2_loss, t2_acc = runs["LoRA factored"]["loss"], runs["LoRA factored"]["accuracy"]
  _, t1_acc_base = map(float, evaluate(base, *test["copy"]))

  # 3. What it costs: step time (interleaved), compiled memory, bytes on disk.
  adapter_dir = lj.save(os.path.join(args.out, "adapter"), delta, cfg,
                        overwrite=True)
  adapter_bytes = dir_bytes(adapter_dir)
  full_dir = os.path.abspath(os.path.join(args.out, "full"))
  shutil.rmtree(full_dir, ignore_errors=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(full_dir, runs["full fine-tuning"]["state"][0])
  full_bytes = dir_bytes(full_dir)
  x, y = map(jnp.asarray, make_batch("reverse", train_rng, args.batch))
  calls = [functools.partial(r["step"], *r["state"], *r["consts"], x, y)
           for r in runs.values()]
  times = interleaved_ms(*calls)
  for r, ms in zip(runs.values(), times):
    r["step_ms"] = ms
    mem = r["step"].lower(*r["state"], *r["consts"], x, y).compile(
        ).memory_analysis()
    r["memory_bytes"] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                         if mem is not None else None)
  ms_full, ms_lora = runs["full fine-tuning"]["step_ms"], runs["LoRA factored"]["step_ms"]
  rows = [("", "trainable params", "loss", "accuracy", "step (ms)",
           "vs full", "memory (KiB)", "on disk (KiB)")]
  for name, r in runs.items():
    trainable = n_params if name == "full fine-tuning" else n_lora
    disk = full_bytes if name == "full fine-tuning" else adapter_bytes
    mem = f"{r['memory_bytes'] / 1024:,.0f}" if r["memory_bytes"] else "n/a"
    rows.append((name, f"{trainable:,} ({trainable / n_params:.1%})",
                 f"{r['loss']:.4f}", f"{r['accuracy']:.1%}",
                 f"{r['step_ms']:.2f}", f"{r['step_ms'] / ms_full:.2f}x", mem,
                 f"{disk / 1024:,.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  say("\n[3] side by side on held-out 'reverse' (before: accuracy "
      f"{t2_acc0:.1%})")
  for i, row in enumerate(rows):
    say("    " + "  ".join(c.rjust(w) if j else c.ljust(w)
                           for j, (c, w) in enumerate(zip(row, widths))))
    if i == 0:
      say("    " + "  ".join("-" * w for w in widths))
  say("    memory: compiled argument + temp bytes of one step; on disk: "
      "lj.save's adapter vs an orbax checkpoint of all params")
  say(f"    held-out 'copy' with the adapter off: accuracy {t1_acc_base:6.1%}"
      f"  (the base is untouched)")
  plot_path = plot_curves({k: r["curve"] for k, r in runs.items()},
                          os.path.join(args.out, "loss_curves.png"))
  say(f"    loss curves: {plot_path}\n" if plot_path else
      "    (matplotlib is not installed: no loss-curve plot)\n")

  # 4. Reload, merge, and check the merged model predicts like the wrapped one.
  loaded = lj.load(adapter_dir)
  saved, restored = flat_arrays(delta), flat_arrays(loaded)
  factors_equal = saved.keys() == restored.keys() and all(
      same_bits(saved[k], restored[k]) for k in saved)
  x = test["reverse"][0]
  merged = jax.jit(fn)(lj.merge(base, loaded), x)
  # wrap's merge engine builds the very same weights as lj.merge: it agrees
  # to rounding. The factored engine computes x @ W0 + s * (x @ a) @ b, which
  # rounds differently, and this net turns a 1-ulp change of every kernel
  # into ~1e-4 in the logits, so it gets a float32 bound relative to them.
  same_weights = jax.jit(lj.wrap(fn, mode="merge"))(base, delta, x)
  as_trained = jax.jit(lj.wrap(fn, mode="factored"))(base, delta, x)
  max_diff = max_abs(merged - same_weights)
  engine_diff = max_abs(merged - as_trained)
  engine_tol = 5e-4 * max(1.0, max_abs(merged))
  argmax_equal = all(bool((y.argmax(-1) == merged.argmax(-1)).all())
                     for y in (same_weights, as_trained))
  ok = (factors_equal and max_diff < 1e-5 and engine_diff < engine_tol
        and argmax_equal)
  say("[4] reload and merge")
  say(f"    reloaded factors bitwise equal: {factors_equal} "
      f"({len(saved)} arrays)")
  say(f"    merged vs wrap(mode='merge'): max |logit diff| {max_diff:.2e}"
      f" (bound 1e-05)")
  say(f"    merged vs wrap() as trained:  max |logit diff| {engine_diff:.2e}"
      f" (float32 rounding; bound {engine_tol:.1e})")
  say(f"    argmax predictions identical: {argmax_equal}")
  say("OK" if ok else "FAILED: the merged model does not match the wrapped one")

  return {
      "runs": {k: {m: r[m] for m in ("loss", "accuracy", "step_ms",
                                     "memory_bytes", "curve")}
               for k, r in runs.items()},
      "full_checkpoint_bytes": full_bytes, "plot": plot_path,
      "task1_loss": t1_loss, "task1_accuracy": t1_acc,
      "task1_accuracy_base_after_lora": t1_acc_base,
      "task2_loss_before": t2_loss0, "task2_accuracy_before": t2_acc0,
      "task2_loss_after": t2_loss, "task2_accuracy_after": t2_acc,
      "params": n_params, "trainable_params": n_lora,
      "trainable_fraction": n_lora / (n_params + n_lora),
      "step_ms_full": ms_full, "step_ms_lora": ms_lora,
      "adapter_dir": adapter_dir, "adapter_bytes": adapter_bytes,
      "params_bytes": params_bytes, "factors_equal": factors_equal,
      "max_merge_diff": max_diff, "max_engine_diff": engine_diff,
      "argmax_equal": argmax_equal, "ok": ok,
  }


def cli(argv=None, prog=None) -> int:
  """The command-line entry point: runs :func:`main`; 0 if its checks pass."""
  return 0 if main(argv, prog)["ok"] else 1


if __name__ == "__main__":
  sys.exit(cli())
