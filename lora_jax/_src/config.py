"""LoraConfig: one frozen, hashable object that says what to adapt and how."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from lora_jax._src.dtypes import is_float_dtype
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import preview

# A selector of leaves: a regex full-matched on the leaf path, several of them,
# or a predicate ``(path, leaf) -> bool``.
Selector = str | Sequence[str] | Callable[[str, Any], bool]

ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian", "pissa", "olora", "loftq")  # + "pissa_niter_<N>"
PRINCIPAL_INITS = ("pissa", "olora")
_NITER = "pissa_niter_"


class InitSpec(NamedTuple):
  """``LoraConfig.init`` parsed: ``kind`` is one of :data:`INITS` or
  ``"callable"``; ``niter`` the power iterations of ``"pissa_niter_<N>"``
  (None for an exact SVD)."""
  kind: str
  niter: int | None = None

  @property
  def principal(self) -> bool:
    """Whether the factors come from ``W0`` and the base becomes a residual."""
    return self.kind in PRINCIPAL_INITS


def parse_init(init: Any) -> InitSpec:
  """The one parser of ``LoraConfig.init``.

  Args:
    init: a name from :data:`INITS`, ``"pissa_niter_<N>"`` or a callable.

  Returns:
    Its :class:`InitSpec`.

  >>> parse_init("pissa_niter_4")
  InitSpec(kind='pissa', niter=4)
  """
  if callable(init):
    return InitSpec("callable")
  if isinstance(init, str) and init in INITS:
    return InitSpec(init)
  if isinstance(init, str) and init.startswith(_NITER) and init[
      len(_NITER):].isdigit():
    return InitSpec("pissa", int(init[len(_NITER):]))
  raise ValueError(f"LoraConfig.init must be one of {INITS}, "
                   f"'pissa_niter_<N>' or a callable, got {init!r}.")


def _compile(pattern: Any, field: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise TypeError(f"LoraConfig.{field}: keys must be regex strings, got "
                    f"{pattern!r}.")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"LoraConfig.{field}: {pattern!r} is not a valid regular "
                     f"expression ({e}).") from None


def _parsed(field: Any) -> PatternMap:
  """A pattern field as ``LoraConfig.__post_init__`` stores it."""
  return field


@dataclasses.dataclass(frozen=True)
class PatternMap:
  """``{regex: value}`` read by full match on a leaf path, first match wins:
  the form of ``LoraConfig.layouts``, ``rank_pattern`` and ``alpha_pattern``.

  Compiled once; equal and hashable by its ``(pattern, value)`` entries, and
  iterable as them.

  >>> m = PatternMap.parse({r".*/q/kernel": 4, r".*": 2}, "rank_pattern")
  >>> m.lookup("h0/q/kernel"), m.lookup("h0/v/kernel"), m.lookup("x/y")
  (4, 2, 2)
  >>> list(m)
  [('.*/q/kernel', 4), ('.*', 2)]
  """
  entries: tuple = ()
  _compiled: tuple = dataclasses.field(default=(), compare=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "_compiled", tuple(
        (re.compile(p), v) for p, v in self.entries))

  @classmethod
  def parse(cls, value: Any, field: str,
            convert: Callable[[str, Any], Any] = lambda p, v: v) -> PatternMap:
    """A PatternMap from a mapping or a sequence of pairs; ``convert(pattern,
    value)`` validates and normalises each value."""
    if isinstance(value, PatternMap):
      value = value.entries
    items = value.items() if isinstance(value, Mapping) else value
    try:
      pairs = [(p, v) for p, v in items]
    except (TypeError, ValueError):
      raise TypeError(f"LoraConfig.{field} must be a dict {{regex: value}} or a "
                      f"list of (regex, value) pairs, got {value!r}.") from None
    for p, _ in pairs:
      _compile(p, field)
    return cls(tuple((p, convert(p, v)) for p, v in pairs))

  def lookup(self, path: str, default: Any = None) -> Any:
    """The value of the first pattern that full-matches ``path``."""
    for pattern, value in self._compiled:
      if pattern.fullmatch(path):
        return value
    return default

  def patterns(self) -> tuple[str, ...]:
    return tuple(p for p, _ in self.entries)

  def __iter__(self):
    return iter(self.entries)

  def __len__(self) -> int:
    return len(self.entries)

  def to_json(self, value_json: Callable[[Any], Any] = lambda v: v) -> list:
    return [[p, value_json(v)] for p, v in self.entries]


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


def check_regex_matches(pattern: str, paths: Sequence[str], who: str,
                        what: str = "leaf path") -> None:
  """Raises unless regex ``pattern`` full-matches one of ``paths`` (a regex
  that matches nothing is almost always a typo).

  Args:
    pattern: the regex.
    paths: the ``'/'``-joined leaf paths it may match.
    who: the field or argument it came from, which the error names.
    what: what the paths are, for the error.

  Raises:
    ValueError: naming ``who``, ``pattern`` and some paths that exist.

  >>> check_regex_matches("w", ["w", "b"], "LoraConfig.targets")
  >>> check_regex_matches("v", ["w", "b"], "LoraConfig.targets")
  Traceback (most recent call last):
  ValueError: LoraConfig.targets: the regex 'v' matches no leaf path (full match on '/'-joined paths). Some paths that exist: ['w', 'b'].
  """
  if not any(re.fullmatch(pattern, p) for p in paths):
    raise ValueError(
        f"{who}: the regex {pattern!r} matches no {what} (full match on "
        f"'/'-joined paths). Some paths that exist: {preview(paths)}.")


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

  Every field is validated and normalised when the config is built (a
  ``TypeError`` or ``ValueError`` naming the field otherwise).

  Attributes:
    rank: rank ``r`` of the update: ``a`` has shape ``(*batch, *in, r)``,
      ``b`` ``(*batch, r, *out)``.
    alpha: the update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)``
      with ``rslora``).
    targets: which leaves get an adapter: a regex full-matched on the
      ``'/'``-joined path, a list of regexes, a callable ``(path, leaf) ->
      bool``, or ``"all-linear"`` (:data:`ALL_LINEAR`: every leaf named
      ``kernel`` with ``ndim >= 2``; with ``apply_fn``, every kernel the
      traced function uses as a linear map).
    exclude: leaves never adapted even if targeted; the same forms as
      ``targets``.
    init: the factors' init: ``"default"`` (A kaiming-uniform(a=sqrt(5))
      over fan-in, B = 0, as PEFT), ``"gaussian"`` (A ~ N(0, 1/rank^2), B =
      0), ``"pissa"`` (principal singular vectors of W0; the base becomes the
      residual), ``"pissa_niter_<N>"`` (the same by randomised SVD with N
      power iterations), ``"olora"`` (QR of W0; residual base), ``"loftq"``
      (for a quantized base: :func:`lora_jax.loftq` builds the quantized
      base and the factors together, ``loftq_iters`` steps), or a callable
      ``(key, a_shape, b_shape, dtype, fan_in) -> (a, b)``.
    rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
    dtype: dtype of the factors; None keeps float32 (float64 for float64
      kernels), whatever the base's dtype, as PEFT does.
    layouts: explicit layouts for kernels tracing cannot resolve, ``{regex:
      Layout}``; the first regex that full-matches a path wins over a traced
      layout.
    dropout: dropout on the input of the LoRA branch only (as PEFT); active
      only when the wrapped function is called with ``lora_rng=key``.
    dora: DoRA: a trainable magnitude per output unit; the adapted kernel is
      ``magnitude * (W0 + s A B) / ||W0 + s A B||`` (norm over the input
      axes, a constant in the backward pass, as PEFT and the paper).
    rank_pattern: per-leaf ranks, ``{regex: rank}`` full-matched on the
      path, the first match winning (PEFT's ``rank_pattern``).
    alpha_pattern: per-leaf alphas, as ``rank_pattern`` (PEFT's
      ``alpha_pattern``).
    trainable_tokens: PEFT's ``trainable_token_indices``, ``{regex: [token
      ids]}``: only those rows of each matching 2-D embedding table ``(vocab,
      dim)`` train, held as their new values in a
      :class:`lora_jax.TrainableTokens` leaf of the delta.
    loftq_iters: LoftQ's alternating steps (``init="loftq"``; PEFT's
      ``loftq_iter``).
    init_spec: ``init`` parsed (derived, not an argument).

  >>> cfg = LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
  >>> cfg.scale
  2.0
  >>> LoraConfig(rank=16, alpha=16.0, rslora=True).scale
  4.0
  """

  rank: int = 8
  alpha: float = 16.0
  targets: Selector = ALL_LINEAR
  exclude: Selector | None = None
  init: str | Callable[..., Any] = "default"
  rslora: bool = False
  dtype: Any = None
  layouts: Mapping[str, Layout] | Sequence[tuple[str, Layout]] = ()
  dropout: float = 0.0
  dora: bool = False
  rank_pattern: Mapping[str, int] | Sequence[tuple[str, int]] = ()
  alpha_pattern: Mapping[str, float] | Sequence[tuple[str, float]] = ()
  trainable_tokens: Mapping[str, Sequence[int]] | Sequence[
      tuple[str, Sequence[int]]] = ()
  loftq_iters: int = 1
  init_spec: InitSpec = dataclasses.field(
      init=False, compare=False, repr=False,
      default=None)  # type: ignore[assignment]  # set by __post_init__

  def __post_init__(self):
    # Each field is parsed once, by its own parser in _FIELDS (which raises on
    # invalid input); what is stored is the normalised form.
    for name, parse in _FIELDS.items():
      object.__setattr__(self, name, parse(getattr(self, name)))
    object.__setattr__(self, "init_spec", parse_init(self.init))

  @property
  def scale(self) -> float:
    """alpha / rank, or alpha / sqrt(rank) with rslora."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def rank_for(self, path: str) -> int:
    """The rank of the adapter at ``path`` (``rank_pattern`` first)."""
    return _parsed(self.rank_pattern).lookup(path, self.rank)

  def scale_for(self, path: str) -> float:
    """The scale of the adapter at ``path`` (with ``alpha_pattern``)."""
    alpha = _parsed(self.alpha_pattern).lookup(path, self.alpha)
    r = self.rank_for(path)
    return alpha / (math.sqrt(r) if self.rslora else r)

  def is_target(self, path: str, leaf: Any) -> bool:
    """Whether the leaf at ``path`` gets an adapter."""
    return selects(self.targets, path, leaf) and not selects(
        self.exclude, path, leaf)

  def layout_for(self, path: str) -> Layout | None:
    """The explicit layout configured for ``path``, if any."""
    return _parsed(self.layouts).lookup(path)

  def check_patterns_match(self, leaves: Sequence[tuple[str, Any]]) -> None:
    """Raises unless every regex of ``targets``, ``exclude``, ``layouts``,
    ``rank_pattern`` and ``alpha_pattern`` full-matches some leaf path (a
    regex that matches nothing is almost always a typo).

    Args:
      leaves: ``(path, leaf)`` of every leaf of the params tree.

    Returns:
      None.

    >>> cfg = LoraConfig(targets="w", rank_pattern={"v": 2})
    >>> try:
    ...   cfg.check_patterns_match([("w", None), ("b", None)])
    ... except ValueError as e:
    ...   print(e)
    LoraConfig.rank_pattern: the regex 'v' matches no leaf path (full match on '/'-joined paths). Some paths that exist: ['w', 'b'].
    """
    paths = [p for p, _ in leaves]
    fields = [("targets", selector_patterns(self.targets)),
              ("exclude", selector_patterns(self.exclude))]
    fields += [(f, getattr(self, f).patterns())
               for f in ("layouts", "rank_pattern", "alpha_pattern",
                         "trainable_tokens")]
    for field, patterns in fields:
      for pattern in patterns:
        check_regex_matches(pattern, paths, f"LoraConfig.{field}")

  def to_json(self) -> dict:
    """A JSON-able description; :meth:`from_json` reads it back. Callables
    (``targets``, ``exclude``, ``init``) are recorded by name only.

    Returns:
      A dict of JSON types (``scale`` is included for readers; it is
      derived).

    >>> cfg = LoraConfig(rank=4, targets=["q", "v"], rank_pattern={"q": 2})
    >>> LoraConfig.from_json(cfg.to_json()) == cfg
    True
    """
    def sel(s):
      if s is None or isinstance(s, str):
        return s
      if callable(s):
        return {"callable": getattr(s, "__qualname__", repr(s))}
      return list(s)
    return {
        "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
        "scale": self.scale, "targets": sel(self.targets),
        "exclude": sel(self.exclude), "init": sel(self.init),
        "dtype": None if self.dtype is None else str(self.dtype),
        "layouts": _parsed(self.layouts).to_json(Layout.to_json),
        "dropout": self.dropout, "dora": self.dora,
        "rank_pattern": _parsed(self.rank_pattern).to_json(),
        "alpha_pattern": _parsed(self.alpha_pattern).to_json(),
        "trainable_tokens": _parsed(self.trainable_tokens).to_json(list),
        "loftq_iters": self.loftq_iters,
    }

  @classmethod
  def from_json(cls, data: Any, **overrides: Any) -> LoraConfig:
    """The config :meth:`to_json` described.

    A callable cannot be restored from its name: pass it in ``overrides``
    (``LoraConfig.from_json(data, targets=my_fn)``), or a ``ValueError`` says
    which field needs it.

    Args:
      data: a dict from :meth:`to_json` (e.g. ``load_metadata(d)["config"]``).
      **overrides: fields to set instead of the recorded ones.

    Returns:
      A :class:`LoraConfig`.

    >>> LoraConfig.from_json({"rank": 4, "alpha": 8.0}).scale
    2.0
    """
    if not isinstance(data, Mapping):
      raise ValueError(f"LoraConfig.from_json expects a dict, got {data!r}.")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names - {"scale"})
    if unknown:
      raise ValueError(f"LoraConfig.from_json: unknown fields {unknown}.")
    kwargs = {k: v for k, v in data.items() if k in names and k not in overrides}
    for field in ("targets", "exclude", "init"):
      if _is_recorded_callable(kwargs.get(field)):
        raise ValueError(
            f"LoraConfig.from_json: {field} was a callable "
            f"({_callable_name(kwargs[field])}), which JSON cannot hold; pass "
            f"it again: LoraConfig.from_json(data, {field}=<the function>).")
    if isinstance(kwargs.get("targets"), list):
      kwargs["targets"] = tuple(kwargs["targets"])
    if isinstance(kwargs.get("exclude"), list):
      kwargs["exclude"] = tuple(kwargs["exclude"])
    if "layouts" in kwargs:
      try:
        kwargs["layouts"] = [(p, Layout.from_json(l)) for p, l in kwargs[
            "layouts"]]
      except (TypeError, ValueError) as e:
        raise ValueError(f"LoraConfig.from_json: bad layouts ({e}).") from None
    return cls(**kwargs, **overrides)


def _is_recorded_callable(value: Any) -> bool:
  # Written as {"callable": name}; "<callable name>" by lora_jax <= 0.1.
  return (isinstance(value, dict) and set(value) == {"callable"}) or (
      isinstance(value, str) and value.startswith("<callable "))


def _callable_name(value: Any) -> str:
  return value["callable"] if isinstance(value, dict) else value


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
      v, (bool, np.bool_))


def _rank(v: Any) -> int:
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
    raise TypeError(f"LoraConfig.rank must be an int, got {v!r}.")
  if v < 1:
    raise ValueError(f"LoraConfig.rank must be >= 1, got {v}.")
  return int(v)


def _float(v: Any) -> float:
  # np.float32(0.1) is the 0.1 its user typed, not 0.10000000149011612.
  return float(str(v)) if isinstance(v, np.floating) else float(v)


def _alpha(v: Any) -> float:
  if not _is_number(v) or not math.isfinite(v) or v <= 0:
    raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {v!r}.")
  return _float(v)


def _dropout(v: Any) -> float:
  if not _is_number(v) or not 0.0 <= v < 1.0:
    raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {v!r}.")
  return _float(v)


def _init(v: Any) -> Any:
  parse_init(v)  # raises for anything else
  return v if callable(v) else str(v)


def _dtype(v: Any) -> Any:
  if v is None:
    return None
  dt = np.dtype(v)
  if not is_float_dtype(dt):
    raise ValueError(f"LoraConfig.dtype must be a floating dtype, got {dt}.")
  return dt


def _token_ids(pattern: str, v: Any) -> tuple[int, ...]:
  where = f"LoraConfig.trainable_tokens[{pattern!r}]"
  if isinstance(v, jax.Array):  # ids a tokenizer gave as a jax array
    if isinstance(v, jax.core.Tracer):
      raise TypeError(f"{where}: token ids are part of the configuration, "
                      f"so they must be concrete; got a traced array (build "
                      f"the LoraConfig outside jit/grad/vmap).")
    v = np.asarray(v)
  if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
    raise TypeError(f"{where} must be a list of token ids (ints), got {v!r}.")
  ids = list(np.asarray(v).reshape(-1).tolist()) if isinstance(
      v, np.ndarray) else list(v)
  if not ids or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                    or i < 0 for i in ids):
    raise ValueError(f"{where} must be a non-empty list of token ids (ints >= "
                     f"0), got {v!r}.")
  dups = sorted(int(i) for i, c in collections.Counter(ids).items() if c > 1)
  if dups:
    raise ValueError(f"{where} lists token ids {dups} more than once; list "
                     f"each id once.")
  return tuple(int(i) for i in ids)


def _loftq_iters(v: Any) -> int:
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) \
      or v < 1:
    raise ValueError(f"LoraConfig.loftq_iters must be an int >= 1, got {v!r}.")
  return int(v)


def _layout_value(pattern: str, v: Any) -> Layout:
  if not isinstance(v, Layout):
    raise TypeError(f"LoraConfig.layouts[{pattern!r}] must be a "
                    f"lora_jax.Layout, got {v!r}.")
  return v


def _pattern_value(field: str, kind: type, ok: Callable, what: str):
  def convert(pattern: str, v: Any):
    if not _is_number(v) or (kind is int and int(v) != v) or not ok(v):
      raise ValueError(f"LoraConfig.{field}[{pattern!r}] must be "
                       f"{kind.__name__} {what}, got {v!r}.")
    return int(v) if kind is int else _float(v)
  return convert


# One parser per field: validates the user's value and returns its normalised
# form (what the frozen config stores).
_FIELDS: dict[str, Callable[[Any], Any]] = {
    "rank": _rank,
    "alpha": _alpha,
    "targets": lambda v: _freeze_selector(v, "targets", allow_none=False),
    "exclude": lambda v: _freeze_selector(v, "exclude", allow_none=True),
    "init": _init,
    "rslora": bool,
    "dtype": _dtype,
    "layouts": lambda v: PatternMap.parse(v, "layouts", _layout_value),
    "dropout": _dropout,
    "dora": bool,
    "rank_pattern": lambda v: PatternMap.parse(v, "rank_pattern", _pattern_value(
        "rank_pattern", int, lambda x: x >= 1, ">= 1")),
    "alpha_pattern": lambda v: PatternMap.parse(
        v, "alpha_pattern", _pattern_value("alpha_pattern", float,
                                           lambda x: x > 0, "> 0")),
    "trainable_tokens": lambda v: PatternMap.parse(v, "trainable_tokens",
                                                   _token_ids),
    "loftq_iters": _loftq_iters,
}
