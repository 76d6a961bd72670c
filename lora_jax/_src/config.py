"""LoraConfig: one frozen, hashable object that says what to adapt and how."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax.numpy as jnp
import numpy as np

from lora_jax._src.layouts import Layout

# A selector of leaves: a regex full-matched on the leaf path, several of them,
# or a predicate ``(path, leaf) -> bool``.
Selector = Union[str, Sequence[str], Callable[[str, Any], bool]]

ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian", "pissa", "olora")  # and "pissa_niter_<N>"


def _valid_init(init: Any) -> bool:
  if callable(init) or init in INITS:
    return True
  return (isinstance(init, str) and init.startswith("pissa_niter_")
          and init[len("pissa_niter_"):].isdigit())


def _compile(pattern: str, field: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"LoraConfig.{field}: {pattern!r} is not a valid regular "
                     f"expression ({e}).") from None


def _freeze_selector(value: Any, field: str, allow_none: bool) -> Any:
  if value is None:
    if allow_none:
      return None
    raise ValueError(f"LoraConfig.{field} must not be None.")
  if callable(value):
    return value
  if isinstance(value, str):
    if value != ALL_LINEAR:
      _compile(value, field)
    return value
  if isinstance(value, (list, tuple)) and value and all(
      isinstance(v, str) for v in value):
    for v in value:
      _compile(v, field)
    return tuple(value)
  raise TypeError(
      f"LoraConfig.{field} must be a regex string, a non-empty list of regex "
      f"strings, a callable (path, leaf) -> bool, or {ALL_LINEAR!r}; got "
      f"{value!r}.")


def is_linear_kernel(path: str, leaf: Any) -> bool:
  """What ``"all-linear"`` selects: every leaf named ``kernel`` with ndim >= 2."""
  return (path.rsplit("/", 1)[-1] == "kernel"
          and len(getattr(leaf, "shape", ())) >= 2)


def selector_patterns(selector: Any) -> tuple[str, ...]:
  """The regexes of a selector (empty for a callable or ``"all-linear"``)."""
  if selector is None or callable(selector) or selector == ALL_LINEAR:
    return ()
  return (selector,) if isinstance(selector, str) else tuple(selector)


def selects(selector: Any, path: str, leaf: Any) -> bool:
  """Whether ``selector`` (regex, list of regexes, callable...) picks a leaf."""
  if selector is None:
    return False
  if callable(selector):
    return bool(selector(path, leaf))
  if selector == ALL_LINEAR:
    return is_linear_kernel(path, leaf)
  return any(re.fullmatch(p, path) for p in selector_patterns(selector))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """What to adapt and how. Frozen and hashable, so it can be a static arg.

  >>> cfg = LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
  >>> cfg.scale
  2.0
  >>> LoraConfig(rank=16, alpha=16.0, rslora=True).scale
  4.0
  """

  # Rank r of the update: a has shape (*batch, *in, r), b (*batch, r, *out).
  rank: int = 8
  # The update is scaled by alpha / rank (alpha / sqrt(rank) with rslora).
  alpha: float = 16.0
  # Which leaves get an adapter: a regex full-matched on the '/'-joined path,
  # a list of regexes, a callable (path, leaf) -> bool, or "all-linear"
  # (every leaf named "kernel" with ndim >= 2).
  targets: Selector = ALL_LINEAR
  # Leaves never adapted even if targeted; same forms as targets.
  exclude: Selector | None = None
  # Factor init: "default" (A kaiming-uniform(a=sqrt(5)) over fan-in, B = 0,
  # as PEFT), "gaussian" (A ~ N(0, 1/rank^2), B = 0), "pissa" (principal
  # singular vectors of W0; the base becomes the residual), "pissa_niter_N"
  # (the same by randomised SVD with N power iterations), "olora" (QR of W0;
  # residual base), or a callable (key, a_shape, b_shape, dtype, fan_in) ->
  # (a, b).
  init: str | Callable[..., Any] = "default"
  # Rank-stabilised scaling alpha / sqrt(rank).
  rslora: bool = False
  # dtype of the factors; None keeps float32 (float64 for float64 kernels),
  # whatever the base's dtype, as PEFT does.
  dtype: Any = None
  # Explicit layouts for kernels tracing cannot resolve: {regex: Layout}.
  # The first regex that full-matches a path wins over a traced layout.
  layouts: Mapping[str, Layout] | Sequence[tuple[str, Layout]] = ()
  # Dropout on the input of the LoRA branch only (as PEFT); active only when
  # the wrapped function is called with lora_rng=key.
  dropout: float = 0.0
  # DoRA: a trainable magnitude per output unit; the adapted kernel is
  # magnitude * (W0 + s*A@B) / ||W0 + s*A@B|| (norm over the input axes,
  # treated as a constant in the backward pass, as PEFT and the paper).
  dora: bool = False
  # Per-leaf overrides, {regex: value}, full-matched on the path; the first
  # match wins (PEFT's rank_pattern / alpha_pattern).
  rank_pattern: Mapping[str, int] | Sequence[tuple[str, int]] = ()
  alpha_pattern: Mapping[str, float] | Sequence[tuple[str, float]] = ()

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
      raise TypeError(f"LoraConfig.rank must be an int, got {self.rank!r}.")
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}.")
    set_("rank", int(self.rank))
    if not isinstance(self.alpha, (int, float, np.number)) or isinstance(
        self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
      raise ValueError(
          f"LoraConfig.alpha must be a finite number > 0, got {self.alpha!r}.")
    set_("alpha", float(self.alpha))
    set_("targets", _freeze_selector(self.targets, "targets", allow_none=False))
    set_("exclude", _freeze_selector(self.exclude, "exclude", allow_none=True))
    if not _valid_init(self.init):
      raise ValueError(f"LoraConfig.init must be one of {INITS}, "
                       f"'pissa_niter_<N>' or a callable, got {self.init!r}.")
    if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
      raise ValueError(
          f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
    set_("dropout", float(self.dropout))
    set_("dora", bool(self.dora))
    set_("rank_pattern", self._patterns("rank_pattern", self.rank_pattern, int,
                                        lambda v: v >= 1, ">= 1"))
    set_("alpha_pattern", self._patterns("alpha_pattern", self.alpha_pattern,
                                         float, lambda v: v > 0, "> 0"))
    if self.dtype is not None:
      dt = np.dtype(self.dtype)
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"LoraConfig.dtype must be a floating dtype, got {dt}.")
      set_("dtype", dt)
    items = (self.layouts.items() if isinstance(self.layouts, Mapping)
             else self.layouts)
    layouts = []
    for pattern, layout in items:
      _compile(pattern, "layouts")
      if not isinstance(layout, Layout):
        raise TypeError(f"LoraConfig.layouts[{pattern!r}] must be a "
                        f"lora_jax.Layout, got {layout!r}.")
      layouts.append((pattern, layout))
    set_("layouts", tuple(layouts))

  @staticmethod
  def _patterns(field, value, kind, ok, what):
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for pattern, v in items:
      _compile(pattern, field)
      if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or (
          kind is int and int(v) != v) or not ok(v):
        raise ValueError(f"LoraConfig.{field}[{pattern!r}] must be "
                         f"{kind.__name__} {what}, got {v!r}.")
      out.append((pattern, kind(v)))
    return tuple(out)

  @property
  def scale(self) -> float:
    """alpha / rank, or alpha / sqrt(rank) with rslora."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def rank_for(self, path: str) -> int:
    """The rank of the adapter at ``path`` (``rank_pattern`` first)."""
    for pattern, r in self.rank_pattern:
      if re.fullmatch(pattern, path):
        return r
    return self.rank

  def scale_for(self, path: str) -> float:
    """The scale of the adapter at ``path`` (with ``alpha_pattern``)."""
    alpha = next((a for p, a in self.alpha_pattern if re.fullmatch(p, path)),
                 self.alpha)
    r = self.rank_for(path)
    return alpha / (math.sqrt(r) if self.rslora else r)

  def is_target(self, path: str, leaf: Any) -> bool:
    """Whether the leaf at ``path`` gets an adapter."""
    return selects(self.targets, path, leaf) and not selects(
        self.exclude, path, leaf)

  def layout_for(self, path: str) -> Layout | None:
    """The explicit layout configured for ``path``, if any."""
    for pattern, layout in self.layouts:
      if re.fullmatch(pattern, path):
        return layout
    return None

  def to_json(self) -> dict:
    """A JSON-able description (callables are recorded by name only)."""
    def sel(s):
      if s is None or isinstance(s, str):
        return s
      if callable(s):
        return f"<callable {getattr(s, '__qualname__', repr(s))}>"
      return list(s)
    return {
        "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
        "scale": self.scale, "targets": sel(self.targets),
        "exclude": sel(self.exclude),
        "init": self.init if isinstance(self.init, str) else sel(self.init),
        "dtype": None if self.dtype is None else str(self.dtype),
        "layouts": [[p, l.to_json()] for p, l in self.layouts],
        "dropout": self.dropout, "dora": self.dora,
        "rank_pattern": [list(x) for x in self.rank_pattern],
        "alpha_pattern": [list(x) for x in self.alpha_pattern],
    }
