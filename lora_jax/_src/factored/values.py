"""The symbolic kernel value the factored engine carries, and its bookkeeping
(the report, fallbacks, dropout keys)."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any
import warnings

import jax
import jax.numpy as jnp

from lora_jax._src import dora
from lora_jax._src import jaxpr_core as jc
from lora_jax._src.delta import LoraDelta
from lora_jax._src.layouts import Layout
from lora_jax._src.quant import QArray


class FallbackError(RuntimeError):
  """Raised under ``strict=True`` when a kernel would have to be merged.

  The message names the kernel's path and the primitive without a factored
  rule; ``mode="merge"`` (or ``strict=False``, which merges that use and
  counts it in :class:`Report`) runs the program.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> base, delta = lj.split({"w": jnp.ones((4, 3))},
  ...                        lj.LoraConfig(rank=2, targets="w"), jax.random.key(0))
  >>> f = lambda p, x: jnp.cumsum(p["w"], axis=0)[0] * x
  >>> try:
  ...   lj.wrap(f, strict=True)(base, delta, 1.0)
  ... except lj.FallbackError as e:
  ...   print(type(e).__name__)
  FallbackError"""


class NeedsRowVmap(Exception):
  """A mixed-adapter batch the engine cannot run on the whole batch at once
  (the rows of an adapted matmul's input cannot be followed, or a per-row
  kernel meets an op without a per-row rule): the caller runs it under
  ``vmap`` over rows instead."""


@dataclasses.dataclass(frozen=True)
class Lora:
  """A kernel value ``w + scale * a @ b`` kept in factored form.

  ``layout`` refers to the axes of ``w`` (a view of the stored kernel); ``a``
  and ``b`` keep their stored axis order, which the layout's tuples follow.
  Views (transpose, cast, slicing a stacked axis) change ``w`` and the layout
  and keep every other field, DoRA's ``magnitude`` included.

  A *narrow* frozen kernel stays narrow: ``w`` may be a :class:`QArray`, or
  a bf16 array the program widens (``dtype``: the pending cast). Consumers
  build the float kernel at the point of use and rebuild it in the backward
  pass (``frozen.frozen_linear``), so no widened copy lives across the step.
  """
  w: Any
  a: Any
  b: Any
  scale: float
  layout: Layout
  path: str
  magnitude: Any = None
  dropout: float = 0.0
  dtype: Any = None  # a widening cast of ``w`` not yet applied
  # A mixed-adapter batch run whole: ``a``, ``b`` and ``scale`` carry a
  # leading row axis (each row's adapter); only dot_general has a rule.
  rows: bool = False

  @property
  def narrow(self) -> bool:
    """Whether ``w`` is stored narrower than the program computes with it."""
    return isinstance(self.w, QArray) or self.dtype is not None

  def kernel(self) -> jax.Array:
    """The float kernel the program sees (dequantized, widened)."""
    w = self.w.dequantize() if isinstance(self.w, QArray) else self.w
    return w if self.dtype is None else w.astype(self.dtype)

  def eager(self) -> Lora:
    """This value with its float kernel built now (for views that re-lay a
    quantized kernel out)."""
    if not self.narrow:
      return self
    return dataclasses.replace(self, w=self.kernel(), dtype=None)

  def parts(self) -> list:
    """The arrays of this value, for passing it through a sub-program."""
    return [self.w, self.a, self.b, self.magnitude]

  def with_parts(self, parts) -> Lora:
    w, a, b, magnitude = parts
    return dataclasses.replace(self, w=w, a=a, b=b, magnitude=magnitude)

  @property
  def delta(self) -> LoraDelta:
    return LoraDelta(self.a, self.b, self.scale, self.layout, self.magnitude,
                     self.dropout)

  def materialize(self) -> jax.Array:
    """``W0 + s a b`` (DoRA: rescaled per output unit) as a plain kernel."""
    return dora.adapted_weight(self.kernel(), self.delta)

  def dora_factor(self, dtype) -> jax.Array:
    """``magnitude / ||W0 + s a b||`` per output unit, norm held constant."""
    return dora.output_factor(self.kernel(), self.delta, dtype)


@dataclasses.dataclass(frozen=True)
class Site:
  """What the analyses say about one equation at one call site.

  Attributes:
    rows: ``(lhs row axis, rhs row axis)`` of a ``dot_general`` in a mixed
      batch run whole (:mod:`rows`), else None.
    projected: ``scale * x @ a`` computed jointly with the siblings reading
      the same ``x`` (:mod:`siblings`), else None.
    evaluate: for a higher-order equation, ``evaluate(program, args, ctx,
      symbolic_outputs=False)`` evaluates a sub-program with this site's
      plan for it (the interpreter).
  """
  rows: tuple | None = None
  projected: Any = None
  evaluate: Callable | None = None


NO_SITE = Site()


def flatten(values: list, scales: bool = False
            ) -> tuple[list, Callable[[list], list]]:
  """Splits values into flat arrays plus a function that rebuilds them: a
  kernel's four parts, and with ``scales`` its scale too where that is data
  (a stack's per-row scale; None for a Python number)."""
  flat: list = []
  spec: list[tuple[int, Lora | None]] = []
  width = 5 if scales else 4
  for x in values:
    if isinstance(x, Lora):
      spec.append((len(flat), x))
      flat.extend(x.parts())
      if scales:
        flat.append(None if isinstance(x.scale, (int, float)) else x.scale)
    else:
      spec.append((len(flat), None))
      flat.append(x)

  def rebuild(flat_vals):
    out = []
    for start, lora in spec:
      if lora is None:
        out.append(flat_vals[start])
        continue
      lora = lora.with_parts(flat_vals[start:start + 4])
      if width == 5 and flat_vals[start + 4] is not None:
        lora = dataclasses.replace(lora, scale=flat_vals[start + 4])
      out.append(lora)
    return out
  return flat, rebuild


@dataclasses.dataclass
class Report:
  """What the engine did with each adapted kernel (from :func:`lora_jax.explain`).

  ``str(report)`` gives one line per kernel and the fallback count.

  Attributes:
    rules: ``{path: [rule, ...]}``, the factored rules each kernel's uses
      took, in the order first taken.
    fallbacks: ``{(path, primitive): count}``, the uses of a kernel by a
      primitive without a factored rule (merged for that use).

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"w": jnp.ones((4, 3))}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="w"),
  ...                        jax.random.key(0))
  >>> report = lj.explain(lambda p, x: x @ p["w"], base, delta, jnp.ones((2, 4)))
  >>> list(report.rules), report.fallbacks
  (['w'], {})
  """
  rules: dict = dataclasses.field(default_factory=dict)
  fallbacks: dict = dataclasses.field(default_factory=dict)

  def record(self, path: str, rule: str):
    self.rules.setdefault(path, [])
    if rule not in self.rules[path]:
      self.rules[path].append(rule)

  def __str__(self) -> str:
    width = max((len(p) for p in self.rules), default=0)
    lines = [f"{p.ljust(width)}  {', '.join(r)}" for p, r in self.rules.items()]
    n = sum(self.fallbacks.values())
    lines.append(f"{n} merge fallback(s)" + (
        ": " + ", ".join(f"{p} ({prim})" for (p, prim) in self.fallbacks)
        if n else ""))
    return "\n".join(lines)


class KeyStream:
  """Dropout keys, one per use: ``fold_in(rng, 1)``, ``fold_in(rng, 2)``, ...
  in the order the program's uses are traced."""

  def __init__(self, rng: jax.Array, used: int = 0):
    self.rng = rng
    self.used = used

  def next(self) -> jax.Array:
    self.used += 1
    return jax.random.fold_in(self.rng, self.used)

  def copy(self) -> KeyStream:
    return KeyStream(self.rng, self.used)


@dataclasses.dataclass(frozen=True)
class Context:
  """Per-call settings of the interpreter, and where it records.

  Rules never change a context: a sub-program with other dropout keys (a
  scan step) gets a new one (:meth:`with_rng`), and a second tracing (a
  backward pass) one that records into a fresh report (:meth:`quiet`).

  Attributes:
    strict: a merge fallback is an error.
    report: what happened to each kernel.
    choose: ``(x_shape, x_contract, lora) -> "factored" | "merge"`` for
      ``mode="auto"``, or None (always factored).
    keys: LoRA dropout's key stream, or None (no dropout: inference).
    recompute: recompute adapters' inputs (:mod:`recompute`).
    in_region: evaluating a recomputed region's members, whose narrow
      frozen products take the form that supports both modes
      (:func:`frozen.frozen_linear`, ``reverse_only=False``): the region's
      own ``custom_vjp`` already widens them in the backward pass, tied to
      the cotangent through the recomputed input.
    shared: backward passes that recompute regions of the same structure
      share, by :func:`recompute._sharing_key` (a memo of traced functions
      for one call: what a rule computes never depends on it).
  """
  strict: bool
  report: Report
  choose: Callable | None = None
  keys: KeyStream | None = None
  recompute: bool = False
  in_region: bool = False
  shared: dict = dataclasses.field(default_factory=dict, compare=False,
                                   repr=False)

  @classmethod
  def create(cls, strict: bool, report: Report, choose: Callable | None,
             rng: jax.Array | None = None, recompute: bool = False
             ) -> Context:
    return cls(strict, report, choose,
               None if rng is None else KeyStream(rng), recompute)

  def with_rng(self, rng: jax.Array | None) -> Context:
    """This context with dropout keys drawn from ``rng``."""
    return dataclasses.replace(
        self, keys=None if rng is None else KeyStream(rng))

  def region(self) -> Context:
    """This context for a recomputed region's members (``in_region``)."""
    return dataclasses.replace(self, in_region=True)

  def quiet(self) -> Context:
    """A copy that records into a fresh report and draws the keys this one
    would draw next (for a second tracing of the same equations, in a
    backward pass)."""
    return dataclasses.replace(
        self, report=Report(),
        keys=None if self.keys is None else self.keys.copy())

  @property
  def has_rng(self) -> bool:
    return self.keys is not None

  def dropping(self, lora: Lora) -> bool:
    return self.keys is not None and lora.dropout > 0

  def next_key(self) -> jax.Array:
    if self.keys is None:  # callers check dropping() first: a bug if not
      raise RuntimeError("lora_jax internal error: a dropout key was asked "
                         "for where no lora_rng was given")
    return self.keys.next()

  def dropout(self, x: jax.Array, lora: Lora) -> jax.Array:
    """Inverted dropout on the LoRA branch's input (as PEFT), if enabled."""
    if not self.dropping(lora):
      return x
    keep = 1.0 - lora.dropout
    mask = jax.random.bernoulli(self.next_key(), keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))

  def fallback(self, lora: Lora, primitive: str) -> jax.Array:
    """``lora`` merged into a plain kernel for one use: counted and warned
    about, an error under ``strict``."""
    if lora.rows:
      raise NeedsRowVmap(f"{lora.path}: {primitive}")
    key = (lora.path, primitive)
    if self.strict:
      raise FallbackError(
          f"lora_jax.wrap(mode='factored', strict=True): no factored rule for "
          f"{primitive!r} consuming {lora.path!r}. Use strict=False to merge "
          f"this kernel for that use (counted and warned about), or "
          f"mode='merge'.")
    if key not in self.report.fallbacks:
      warnings.warn(
          f"lora_jax factored engine: {primitive!r} consumes {lora.path!r} and "
          f"has no factored rule; merging that kernel for this use.",
          stacklevel=4)
    self.report.fallbacks[key] = self.report.fallbacks.get(key, 0) + 1
    self.report.record(lora.path, f"merge-fallback ({primitive})")
    return lora.materialize()

  def concrete(self, x: Any, what: str) -> Any:
    """``x`` as a plain array (merging a :class:`Lora` by :meth:`fallback`)."""
    if isinstance(x, Lora) and x.rows:
      raise NeedsRowVmap(f"{x.path}: {what}")
    return self.fallback(x, what) if isinstance(x, Lora) else x


def fallback(eqn, invals, ctx: Context) -> list:
  """Merges every kernel among ``invals`` for this one use."""
  for x in invals:
    if isinstance(x, Lora) and ctx.dropping(x):
      raise FallbackError(
          f"lora_jax: {x.path!r} has LoRA dropout and is consumed by "
          f"{eqn.primitive.name!r} in a way the factored engine cannot "
          f"express; merging cannot apply input dropout. Set dropout=0 for "
          f"this leaf or call without lora_rng.")
  return jc.bind(eqn, [ctx.concrete(x, eqn.primitive.name) for x in invals])
