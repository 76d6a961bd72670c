"""The demo: pretrain a tiny transformer, then teach it a new task with LoRA.

A two-block decoder-only transformer (Flax Linen) learns to *copy* a sequence
of digits (task 1, all parameters trained), then learns to *reverse* it (task
2) with LoRA on every attention and MLP kernel while the base stays frozen.
The demo prints held-out accuracy before and after, what is trainable, and
a table of four ways to learn task 2 (LoRA with each engine, full
fine-tuning, and QLoRA: the same adapters on an nf4-quantized base) with
step time, compiled memory and size on disk, plus the compiled memory of the
same three kinds of step on a W3-size model, where parameters dominate; then
it reloads the adapter, merges it into the base and checks that the merged
model predicts what the wrapped one does: bit for bit against wrap's merge
engine, to float32 rounding against the engine used in training.

Run it with ``python -m lora_jax demo`` (or ``lora-jax-demo``); ``--help``
lists the flags. The data is generated locally; with the default flags it
runs in about two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import dataclasses
import functools
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, TextIO

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
    self.start: float | None = None
    self.last: float | None = None
    self.drawn = 0  # length of the line on screen, to blank a longer one

  def update(self, step: int, loss: Callable[[], float]):
    """Reports ``step`` (1-based); ``loss`` is called only when drawing."""
    if not self.enabled:
      return
    now = time.perf_counter()
    if self.start is None:
      self.start = self.last = now  # the first step compiles: rate from here
    done = step == self.total
    last = now if self.last is None else self.last
    if self.tty and not done and now - last < 0.1:
      return
    if not self.tty and not done and step % self.every:
      return
    self.last = now
    start = now if self.start is None else self.start
    rate = (step - 1) / (now - start) if now > start else 0.0
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

def make_step(model, tx):
  """A jitted optimizer step for ``model(trainable, *frozen, x) -> logits``.

  Called as ``step((trainable, opt_state), frozen, x, y)``; returns the new
  ``(trainable, opt_state)`` and the loss. Every variant of the demo is this
  step on its own model: full fine-tuning trains the params (``frozen`` is
  empty), LoRA and QLoRA train the delta of a frozen (quantized) base. So
  each step takes exactly what its loop holds.
  """
  @jax.jit
  def step(state, frozen, x, y):
    trainable, opt_state = state
    loss, g = jax.value_and_grad(
        lambda t: loss_and_accuracy(model(t, *frozen, x), y)[0])(trainable)
    updates, opt_state = tx.update(g, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state), loss
  return step


def train(step, state, frozen, task, steps, batch, rng, progress):
  """Runs ``step`` on ``steps`` fresh batches of ``task``.

  Returns the final state and the list of training losses.
  """
  curve = []
  for i in range(1, steps + 1):
    state, loss = step(state, frozen, *make_batch(task, rng, batch))
    curve.append(loss)
    progress.update(i, lambda loss=loss: float(loss))
  return state, [float(l) for l in curve]


def interleaved_ms(*fns: Callable[[], Any], rounds: int = 20) -> list[float]:
  """Median time in ms of each (compiled) function, called in turn.

  Running A B A B ... rather than all A then all B makes a busy, shared
  machine slow them alike, so their ratio holds.
  """
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(rounds):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
  return [1e3 * statistics.median(ts) for ts in times]


def plot_curves(curves: dict[str, list[float]], path: str) -> str | None:
  """Writes the training-loss curves to a PNG; None without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
  p.add_argument("--w3-memory", action=argparse.BooleanOptionalAction,
                 default=True,
                 help="also compile (not run) the full, LoRA and QLoRA steps "
                 "of a W3-size model (benchmarks/w3.py) and print their "
                 "memory (default: on)")
  p.add_argument("--quiet", action="store_true",
                 help="print nothing (no report, no progress bar)")
  args = p.parse_args(argv)
  if min(args.steps_pretrain, args.steps_lora, args.rank, args.batch) < 1:
    p.error("--steps-pretrain, --steps-lora, --rank and --batch must be >= 1")
  return args


# --- results ----------------------------------------------------------------

@dataclasses.dataclass
class Score:
  """Held-out mean loss and accuracy (answer tokens only)."""
  loss: float
  accuracy: float


@dataclasses.dataclass
class Run:
  """One way of learning task 2: its numbers in the demo's table."""
  score: Score
  curve: list[float]      # training loss per step
  trainable: int          # trainable parameters
  step_ms: float = 0.0    # median step time
  memory_bytes: int | None = None  # compiled argument + temp bytes of a step
  disk_bytes: int = 0     # what saving the trained part takes


@dataclasses.dataclass
class MergeCheck:
  """The reloaded, merged adapter against the wrapped model."""
  factors_equal: bool     # reloaded factors bitwise equal to the saved ones
  arrays: int             # how many factor arrays were compared
  max_merge_diff: float   # merged vs wrap(mode="merge") logits
  max_engine_diff: float  # merged vs wrap() as trained (factored) logits
  engine_tol: float
  argmax_equal: bool

  @property
  def ok(self) -> bool:
    return (self.factors_equal and self.max_merge_diff < 1e-5
            and self.max_engine_diff < self.engine_tol and self.argmax_equal)


@dataclasses.dataclass
class Result:
  """What :func:`main` returns."""
  params: int             # parameters of the model
  params_bytes: int
  pretrained: Score       # held-out 'copy' after pretraining
  before: Score           # held-out 'reverse' before task 2
  base_copy: Score        # held-out 'copy' of the frozen base after task 2
  runs: dict[str, Run]    # the table's rows, by name
  adapter_dir: str
  plot: str | None
  check: MergeCheck
  w3: dict[str, int] | None = None  # W3-size compiled bytes, if measured

  @property
  def ok(self) -> bool:
    return self.check.ok


FULL, FACTORED, MERGE, QLORA = ("full fine-tuning", "LoRA factored",
                                "LoRA merge", "QLoRA nf4")


# --- the steps of the demo --------------------------------------------------

def build_data(seed: int):
  """The training rng and the held-out sets (1000 sequences per task)."""
  test_rng = np.random.default_rng(seed + 1)
  return (np.random.default_rng(seed),
          {t: make_batch(t, test_rng, 1000) for t in TASKS})


def build_model(args, example, say):
  """The model's apply function and its freshly initialized params."""
  model = TinyGPT(d_model=args.width)
  params = model.init(jax.random.key(args.seed), example)["params"]
  say(f"lora_jax demo: decoder-only transformer, {model.blocks} blocks, "
      f"d_model {model.d_model}, {model.heads} heads, "
      f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters")
  say("task 1 'copy':    3 1 4 1 5 9 2 6 | -> 3 1 4 1 5 9 2 6\n"
      "task 2 'reverse': 3 1 4 1 5 9 2 6 | -> 6 2 9 5 1 4 1 3\n")
  return (lambda p, x: model.apply({"params": p}, x)), params


def pretrain(fn, params, args, rng, test, say):
  """Trains every parameter on 'copy'.

  Returns the trained params, their held-out 'copy' score and their
  held-out 'reverse' score (before task 2).
  """
  say(f"[1] pretraining all parameters on 'copy' ({args.steps_pretrain} "
      f"steps, batch {args.batch}, adam 3e-3)")
  tx = optax.adam(3e-3)
  (params, _), _ = train(
      make_step(fn, tx), (params, tx.init(params)), (), "copy",
      args.steps_pretrain, args.batch, rng,
      Progress(args.steps_pretrain, "pretrain", not args.quiet))
  copy, before = (evaluate(fn, params, test[t]) for t in ("copy", "reverse"))
  say(f"    held-out 'copy':    loss {copy.loss:7.4f}  accuracy "
      f"{copy.accuracy:6.1%}")
  say(f"    held-out 'reverse': loss {before.loss:7.4f}  accuracy "
      f"{before.accuracy:6.1%}  (before LoRA)\n")
  return params, copy, before


def split_for_lora(fn, params, args, example, say):
  """Splits the pretrained params into a frozen base and a fresh delta.

  Returns the config, the base, the delta and QLoRA's nf4 block size.
  """
  cfg = lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
  base, delta = lj.split(params, cfg, jax.random.key(args.seed + 1),
                         apply_fn=fn, example_args=(example,))
  block = math.gcd(64, args.width)  # divides every kernel's input axis
  say(f"[2] 'reverse' four ways, {args.steps_lora} steps each, same data: "
      f"LoRA (factored engine), LoRA (merge engine), full fine-tuning, "
      f"QLoRA (nf4 base, block {block})")
  say(f"    LoRA rank {cfg.rank}, alpha {cfg.alpha:g} (scale {cfg.scale:g}) "
      f"on {args.targets}; adam {LORA_LR:g} for LoRA, 1e-3 for full")
  say("    " + lj.summary(base, delta).replace("\n", "\n    "))
  return cfg, base, delta, block


def variants(fn, params, base, delta, targets, block_size):
  """``{name: (model, lr, trainable, frozen)}`` for task 2.

  ``model(trainable, *frozen, x)`` gives logits. QLoRA trains the same
  adapters as LoRA on a base whose adapted kernels are nf4.
  """
  qbase = lj.quantize(base, "nf4", block_size=block_size, targets=targets,
                      delta=delta)

  def lora(mode):
    wrapped = lj.wrap(fn, mode)
    return lambda d, b, x: wrapped(b, d, x)  # trainable first, as make_step
  return {
      FACTORED: (lora("factored"), LORA_LR, delta, (base,)),
      MERGE: (lora("merge"), LORA_LR, delta, (base,)),
      FULL: (fn, 1e-3, jax.tree.map(jnp.copy, params), ()),
      QLORA: (lora("factored"), LORA_LR, delta, (qbase,)),
  }


def train_variant(name, model, lr, trainable, frozen, args, test):
  """Trains one variant on 'reverse' (the same batches for all).

  Returns its final state, its jitted step and its table row.
  """
  tx = optax.adam(lr)
  step = make_step(model, tx)
  state, curve = train(
      step, (trainable, tx.init(trainable)), frozen, "reverse",
      args.steps_lora, args.batch, np.random.default_rng(args.seed + 7),
      Progress(args.steps_lora, f"{name:<16}", not args.quiet))
  score = evaluate(model, state[0], test["reverse"], frozen)
  return state, step, Run(score, curve, sum(
      x.size for x in jax.tree.leaves(trainable)))


def evaluate(model, trainable, data, frozen=()) -> Score:
  """Held-out loss and accuracy of ``model(trainable, *frozen, x)``."""
  ev = jax.jit(lambda t, f, x, y: loss_and_accuracy(model(t, *f, x), y))
  return Score(*map(float, ev(trainable, frozen, *data)))


def measure(runs, trained, x, y):
  """Fills each run's step time (interleaved) and compiled memory."""
  calls = [functools.partial(step, state, frozen, x, y)
           for step, state, frozen in trained.values()]
  for run, ms in zip(runs.values(), interleaved_ms(*calls)):
    run.step_ms = ms
  for run, (step, state, frozen) in zip(runs.values(), trained.values()):
    mem = step.lower(state, frozen, x, y).compile().memory_analysis()
    run.memory_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                        if mem is not None else None)


def save_all(out, runs, trained, cfg) -> str:
  """Saves each variant's trained part; fills ``disk_bytes``.

  LoRA variants go through :func:`lora_jax.save`, full fine-tuning through
  an orbax checkpoint of all params. Returns the LoRA factored adapter's dir.
  """
  dirs = {}
  for name, (_, (trainable, _), _) in trained.items():
    path = os.path.abspath(os.path.join(out, _DIRS[name]))
    if name == FULL:
      shutil.rmtree(path, ignore_errors=True)
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, trainable)
    else:
      path = lj.save(path, trainable, cfg, overwrite=True)
    runs[name].disk_bytes, dirs[name] = dir_bytes(path), path
  return dirs[FACTORED]


_DIRS = {FACTORED: "adapter", MERGE: "adapter_merge", FULL: "full",
         QLORA: "adapter_qlora"}


def _w3_module():
  """benchmarks/w3.py, imported from the source tree beside the package or
  from ./benchmarks (an installed wheel run from a checkout's copy); None
  when neither has it."""
  beside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "benchmarks")
  found = [d for d in (beside, os.path.abspath("benchmarks"))
           if os.path.exists(os.path.join(d, "w3.py"))]
  if not found:
    return None
  bench = found[0]
  if bench not in sys.path:
    sys.path.insert(0, bench)
  import w3
  return w3


def w3_size(**changes):
  """W3's ``w1.Size`` (benchmarks/w3.py) with ``changes``."""
  return dataclasses.replace(_w3_module().SIZE, **changes)


def w3_memory(size=None) -> dict[str, int] | None:
  """Compiled argument + temp bytes of the full, LoRA and QLoRA steps on a
  W3-size model, built by benchmarks/w3.py (its model and its steps, each
  taking exactly what its loop holds; QLoRA: block kernels nf4, the rest
  bf16). None when the benchmarks are not beside the package.

  Lowers and compiles only; no step runs (about 15 s on two CPU cores).
  ``size``: a ``w1.Size``, default W3's (d_model 1024, 8 blocks, vocab
  32000, batch 1 x 128).
  """
  w3 = _w3_module()
  if w3 is None:
    return None
  apply, params, _, delta, tokens = w3.w1.setup(size or w3.SIZE)
  names = {"full": FULL, "lora_f32": FACTORED, "qlora_nf4": QLORA}
  steps = w3.make_steps(apply, params, w3.bases(params), delta, tokens,
                        tuple(names))
  out = {}
  for key, name in names.items():
    fn, state, frozen = steps[key]
    mem = fn.lower(state, *frozen, tokens).compile().memory_analysis()
    out[name] = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)
  return out


def check_merge(fn, base, delta, adapter_dir, x) -> MergeCheck:
  """Reloads the adapter, merges it and compares with the wrapped model."""
  loaded = lj.load(adapter_dir)
  saved, restored = flat_arrays(delta), flat_arrays(loaded)
  factors_equal = saved.keys() == restored.keys() and all(
      same_bits(saved[k], restored[k]) for k in saved)
  merged = jax.jit(fn)(lj.merge(base, loaded), x)
  # wrap's merge engine builds the very same weights as lj.merge: it agrees
  # to rounding. The factored engine computes x @ W0 + s * (x @ a) @ b, which
  # rounds differently, and this net turns a 1-ulp change of every kernel
  # into ~1e-4 in the logits, so it gets a float32 bound relative to them.
  same_weights = jax.jit(lj.wrap(fn, mode="merge"))(base, delta, x)
  as_trained = jax.jit(lj.wrap(fn, mode="factored"))(base, delta, x)
  return MergeCheck(
      factors_equal=factors_equal, arrays=len(saved),
      max_merge_diff=max_abs(merged - same_weights),
      max_engine_diff=max_abs(merged - as_trained),
      engine_tol=5e-4 * max(1.0, max_abs(merged)),
      argmax_equal=all(bool((y.argmax(-1) == merged.argmax(-1)).all())
                       for y in (same_weights, as_trained)))


# --- report -----------------------------------------------------------------

def table(runs: dict[str, Run], params: int) -> list[str]:
  """The side-by-side table's lines."""
  ms_full = runs[FULL].step_ms
  rows = [("", "trainable params", "loss", "accuracy", "step (ms)",
           "vs full", "memory (KiB)", "on disk (KiB)")]
  for name, r in runs.items():
    mem = f"{r.memory_bytes / 1024:,.0f}" if r.memory_bytes else "n/a"
    rows.append((name, f"{r.trainable:,} ({r.trainable / params:.1%})",
                 f"{r.score.loss:.4f}", f"{r.score.accuracy:.1%}",
                 f"{r.step_ms:.2f}", f"{r.step_ms / ms_full:.2f}x", mem,
                 f"{r.disk_bytes / 1024:,.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) if j else c.ljust(w)
                     for j, (c, w) in enumerate(zip(row, widths)))
           for row in rows]
  return lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]


def memory_lines(runs: dict[str, Run],
                 w3: dict[str, int] | None) -> list[str]:
  """Whether LoRA and QLoRA save compiled memory here, and at W3 size."""
  mem = [runs[n].memory_bytes or 0 for n in (QLORA, FACTORED, FULL)]
  lines = ["memory here: QLoRA < LoRA < full fine-tuning"
           if mem[0] < mem[1] < mem[2] else
           "memory here: activations (batch x tokens), not parameters, fill "
           f"a model this small: LoRA {mem[1] / mem[2]:.2f}x and QLoRA "
           f"{mem[0] / mem[2]:.2f}x full fine-tuning's"]
  if w3 is None:
    lines.append("W3 size: not measured (run from a source checkout with "
                 "--w3-memory, about 15 s; benchmarks/w3.py builds it)")
    return lines
  f, l, q = (w3[n] / 2**20 for n in (FULL, FACTORED, QLORA))
  lines.append(
      "W3 size (d_model 1024, 8 blocks, vocab 32000, batch 1x128; compiled "
      f"args + temp, no step run): full {f:,.0f} MiB, LoRA {l:,.0f} MiB "
      f"({l / f:.2f}x), QLoRA nf4 {q:,.0f} MiB ({q / f:.2f}x)")
  return lines


def report(say, res: Result):
  """Prints sections [3] and [4]."""
  say("\n[3] side by side on held-out 'reverse' (before: accuracy "
      f"{res.before.accuracy:.1%})")
  for line in table(res.runs, res.params):
    say("    " + line)
  say("    memory: compiled argument + temp bytes of one step; on disk: "
      "lj.save's adapter vs an orbax checkpoint of all params")
  say("    QLoRA nf4: the same adapters on a base whose adapted kernels are "
      "nf4 (lj.quantize)")
  for line in memory_lines(res.runs, res.w3):
    say("    " + line)
  say(f"    held-out 'copy' with the adapter off: accuracy "
      f"{res.base_copy.accuracy:6.1%}  (the base is untouched)")
  say(f"    loss curves: {res.plot}\n" if res.plot else
      "    (matplotlib is not installed: no loss-curve plot)\n")
  c = res.check
  say("[4] reload and merge")
  say(f"    reloaded factors bitwise equal: {c.factors_equal} "
      f"({c.arrays} arrays)")
  say(f"    merged vs wrap(mode='merge'): max |logit diff| "
      f"{c.max_merge_diff:.2e} (bound 1e-05)")
  say(f"    merged vs wrap() as trained:  max |logit diff| "
      f"{c.max_engine_diff:.2e} (float32 rounding; bound {c.engine_tol:.1e})")
  say(f"    argmax predictions identical: {c.argmax_equal}")
  say("OK" if c.ok else
      "FAILED: the merged model does not match the wrapped one")


def main(argv=None, prog=None) -> Result:
  """Runs the demo and returns its numbers.

  ``argv`` defaults to ``sys.argv[1:]``. The command-line entry point is
  :func:`cli`, which turns the result into an exit status.
  """
  args = parse_args(argv, prog)
  say = ((lambda *a: None) if args.quiet
         else functools.partial(print, flush=True))
  train_rng, test = build_data(args.seed)
  example = test["copy"][0][:1]
  fn, params = build_model(args, example, say)
  params, pretrained, before = pretrain(fn, params, args, train_rng, test, say)
  cfg, base, delta0, block = split_for_lora(fn, params, args, example, say)

  runs, trained = {}, {}
  for name, (model_fn, lr, trainable, frozen) in variants(
      fn, params, base, delta0, args.targets, block).items():
    state, step, runs[name] = train_variant(name, model_fn, lr, trainable,
                                            frozen, args, test)
    trained[name] = (step, state, frozen)

  measure(runs, trained, *map(jnp.asarray,
                              make_batch("reverse", train_rng, args.batch)))
  adapter_dir = save_all(args.out, runs, trained, cfg)
  delta = trained[FACTORED][1][0]
  res = Result(
      params=sum(x.size for x in jax.tree.leaves(params)),
      params_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
      pretrained=pretrained, before=before,
      base_copy=evaluate(fn, base, test["copy"]), runs=runs,
      adapter_dir=adapter_dir,
      plot=plot_curves({k: r.curve for k, r in runs.items()},
                       os.path.join(args.out, "loss_curves.png")),
      check=check_merge(fn, base, delta, adapter_dir, test["reverse"][0]),
      w3=w3_memory() if args.w3_memory else None)
  report(say, res)
  return res


def cli(argv=None, prog=None) -> int:
  """The command-line entry point: runs :func:`main`; 0 if its checks pass."""
  return 0 if main(argv, prog).ok else 1


if __name__ == "__main__":
  sys.exit(cli())
