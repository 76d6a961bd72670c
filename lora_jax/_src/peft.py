"""PyTorch PEFT's adapter format, both ways: ``save_peft``, ``load_peft`` and
the serving check ``check_vllm``.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. Per adapted module ``<m>`` (a torch module
name such as ``model.layers.0.self_attn.q_proj``) the file holds
``base_model.model.<m>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
``(out, r)``, with ``delta W = scale * B @ A`` on torch's ``(out, in)``
weight; DoRA adds ``...lora_magnitude_vector`` ``(out,)``. In lora_jax's
terms ``A = a.T`` and ``B = b.T`` once an N-D kernel is flattened to its
``(out, in)`` view by its :class:`lora_jax.Layout` (transposed storage
included), so the arithmetic is exactly the same.

PEFT resolves ``rank_pattern`` / ``alpha_pattern`` per module name: a key
``k`` applies to module ``m`` when ``re.match(rf"(.*\\.)?({k})$", m)``, the
first such key in the dict's order winning. :func:`pattern_key` is that rule,
and both directions use it, so a file means the same in PEFT and here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import difflib
import json
import math
import os
import re
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import safetensors
from lora_jax._src.config import LoraConfig
from lora_jax._src.config import PatternMap
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.dtypes import is_float_matrix
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Suffixes of the tensors of one module in PEFT's saved state dict.
_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"

# A path -> PEFT module name mapping: a preset name (MODULE_NAME_PRESETS), a
# callable, or (regex, replacement) pairs (the first pair whose regex
# full-matches a path names it; a path no pair matches keeps the default
# name). A name may be a list of names: the kernel's first output axis is
# split among those modules (a fused projection, as Gemma's kv_einsum).
ModuleNames = None | str | Callable[[str], Any] | Sequence[tuple[str, Any]]

# tunix's NNX decoders (google/tunix, tunix/models/*/model.py), named as
# their checkpoint loaders (params*.py) map them from transformers'
# safetensors: torch module <- leaf path, exactly one way. "[i]" is the
# entry i of a stacked kernel's batch axis (MoE experts; a kv_einsum given a
# leading batch axis by layouts=); a tuple splits the first output axis.
_TUNIX_ATTN = ((r"layers/(\d+)/attn/(q_proj|k_proj|v_proj|o_proj)/w",
                r"model.layers.\1.self_attn.\2"),)
_TUNIX_MLP = ((r"layers/(\d+)/mlp/(gate_proj|up_proj|down_proj)/kernel",
               r"model.layers.\1.mlp.\2"),)
_GEMMA_KV = (r"model.layers.\1.self_attn.k_proj",
             r"model.layers.\1.self_attn.v_proj")
MODULE_NAME_PRESETS: dict[str, tuple | None] = {
    # transformers' Flax ports: leaf paths are torch's names already.
    "transformers": None,
    # tunix.models.qwen3 -> Qwen3ForCausalLM / Qwen3MoeForCausalLM
    "tunix-qwen3": _TUNIX_ATTN + _TUNIX_MLP + (
        (r"layers/(\d+)/mlp/router/kernel", r"model.layers.\1.mlp.gate"),
        (r"layers/(\d+)/mlp/(gate_proj|up_proj|down_proj)\[(\d+)\]",
         r"model.layers.\1.mlp.experts.\3.\2"),
        (r"lm_head/w", "lm_head")),
    # tunix.models.llama3 -> LlamaForCausalLM
    "tunix-llama3": _TUNIX_ATTN + _TUNIX_MLP + ((r"lm_head/w", "lm_head"),),
    # tunix.models.gemma3 -> Gemma3ForCausalLM (the text model; lm_head is
    # the tied embedding). kv_einsum (2, K, D, H) holds k_proj and v_proj,
    # qkv_einsum (3, N, D, H) all three (when N == K).
    "tunix-gemma3": (
        (r"layers/(\d+)/attn/q_einsum/w", r"model.layers.\1.self_attn.q_proj"),
        (r"layers/(\d+)/attn/kv_einsum/w", _GEMMA_KV),
        (r"layers/(\d+)/attn/kv_einsum/w\[0\]", _GEMMA_KV[0]),
        (r"layers/(\d+)/attn/kv_einsum/w\[1\]", _GEMMA_KV[1]),
        (r"layers/(\d+)/attn/qkv_einsum/w",
         (r"model.layers.\1.self_attn.q_proj",) + _GEMMA_KV),
        (r"layers/(\d+)/attn/qkv_einsum/w\[0\]",
         r"model.layers.\1.self_attn.q_proj"),
        (r"layers/(\d+)/attn/qkv_einsum/w\[1\]", _GEMMA_KV[0]),
        (r"layers/(\d+)/attn/qkv_einsum/w\[2\]", _GEMMA_KV[1]),
        (r"layers/(\d+)/attn/attn_vec_einsum/w",
         r"model.layers.\1.self_attn.o_proj")) + _TUNIX_MLP,
}

# adapter_config.json fields that change what the adapter computes and that
# lora_jax cannot honour, with the values that mean "not used" (PEFT's
# defaults, and what its older versions wrote). Fields that only steer
# training or initialisation (exclude_modules, eva_config ...) are ignored.
_UNSUPPORTED: dict[str, Any] = {
    "layers_to_transform": (None, []),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "lora_bias": (None, False),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (None, False),
    "layer_replication": (None, []),
    "arrow_config": (None,),
    "use_bdlora": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
}
# Inits that rewrite the base weights: such an adapter belongs with PEFT's
# modified base, unless PEFT converted it on saving (then the field is True).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class PeftFormatError(ValueError):
  """A PEFT adapter directory lora_jax cannot read (or a delta it cannot
  write as one); the message names the file, key or field, and the remedy."""


# ------------------------------------------------------------------ names


def default_module_name(path: str) -> str:
  """The torch module name of a leaf path: the leaf's name dropped, the rest
  joined with ``.`` (right for transformers' Flax ports).

  Args:
    path: a '/'-joined leaf path.

  Returns:
    The module name.

  >>> default_module_name("model/layers/0/self_attn/q_proj/kernel")
  'model.layers.0.self_attn.q_proj'
  """
  return ".".join(path.split("/")[:-1])


def _preset_list() -> str:
  return ", ".join(repr(k) for k in MODULE_NAME_PRESETS)


def _pairs_namer(pairs, fallback):
  compiled = [(re.compile(p), r) for p, r in pairs]

  def name(path: str):
    for pattern, replacement in compiled:
      m = pattern.fullmatch(path)
      if m:
        if isinstance(replacement, (tuple, list)):
          return [m.expand(r) for r in replacement]
        return m.expand(replacement)
    return fallback(path)
  return name


class _Namer:
  """``module_names`` made a callable ``path -> name | [names] | None``
  (None: no torch module); ``what`` says where the names come from, for
  messages."""

  def __init__(self, module_names: ModuleNames):
    self.fn: Callable[[str], Any]
    self.preset: str | None = None  # a preset naming only the leaves it knows
    if module_names is None:
      self.fn, self.what = default_module_name, "module_names"
      return
    if isinstance(module_names, str):
      if module_names not in MODULE_NAME_PRESETS:
        raise ValueError(
            f"module_names={module_names!r} is not a known preset; the "
            f"presets are {_preset_list()}. Otherwise pass a callable path -> "
            f"name or a list of (regex, replacement) pairs.")
      self.what = f"module_names={module_names!r}"
      pairs = MODULE_NAME_PRESETS[module_names]
      if pairs is None:  # the default names
        self.fn = default_module_name
        return
      # A preset names exactly the leaves it knows: any other has no module.
      self.preset = module_names
      self.fn = _pairs_namer(pairs, lambda p: None)
      return
    self.what = "module_names"
    if callable(module_names):
      self.fn = module_names
      return
    try:
      self.fn = _pairs_namer(module_names, default_module_name)
    except (TypeError, ValueError, re.error) as e:
      raise TypeError(
          f"module_names must be a preset name ({_preset_list()}), a "
          f"callable path -> name or a list of (regex, replacement) pairs, "
          f"got {module_names!r} ({e}).") from None

  def __call__(self, path: str):
    return self.fn(path)

  def known(self, path: str) -> str | None:
    """The single name of ``path``, or None (no module, or a split)."""
    name = self.fn(path)
    return name if isinstance(name, str) and name else None

  def names(self, path: str, default_ok: bool = True) -> list[str]:
    """The module name(s) of ``path``, or an error that says how to name
    it; ``default_ok=False`` refuses the default name (a stacked entry)."""
    name = self.fn(path)
    names = list(name) if isinstance(name, (tuple, list)) else [name]
    if name is None and self.preset is not None:
      raise PeftFormatError(
          f"{self.what} names no torch module for {path!r}: the preset "
          f"names {_preset_patterns(self.preset)}. Leave this leaf out of "
          f"LoraConfig.targets (PEFT's LoRA adapts Linear modules), or pass "
          f"module_names=[(regex, replacement), ...] or a callable that "
          f"names it.")
    if not names or not all(isinstance(n, str) and n for n in names):
      raise PeftFormatError(
          f"{self.what} gave {name!r} for {path!r}; PEFT needs a non-empty "
          f"torch module name such as 'model.layers.0.self_attn.q_proj'. Pass "
          f"module_names=[(regex, replacement), ...] or a callable that names "
          f"it.")
    if not default_ok and self.preset is None and name == default_module_name(
        path):
      return []
    return names


def _preset_patterns(preset: str) -> str:
  pairs = MODULE_NAME_PRESETS[preset]
  return ", ".join(p for p, _ in pairs) if pairs else "every leaf"


def _namer(module_names: ModuleNames) -> _Namer:
  return module_names if isinstance(module_names, _Namer) else _Namer(
      module_names)


def pattern_key(keys: Sequence[str], module: str) -> str | None:
  """The first of PEFT's ``rank_pattern`` / ``alpha_pattern`` ``keys`` that
  applies to ``module`` (PEFT's rule: ``re.match(rf"(.*\\.)?({key})$",
  module)``), or None.

  Args:
    keys: the pattern keys, in the file's order.
    module: a torch module name.

  Returns:
    The matching key or None.

  >>> pattern_key(["q_proj", "layers.1.v_proj"], "model.layers.1.v_proj")
  'layers.1.v_proj'
  >>> pattern_key(["proj"], "model.q_proj") is None
  True
  """
  for key in keys:
    if re.match(rf"(.*\.)?({key})$", module):
      return key
  return None


def _targets_module(targets: Sequence[str], module: str) -> bool:
  # PEFT's rule for a list of target_modules: the name, or a '.'-suffix.
  return any(module == t or module.endswith("." + t) for t in targets)


def _suffix(name: str, k: int) -> str:
  return ".".join(name.split(".")[-k:])


def _shortest_suffixes(chosen: Sequence[str], others: Sequence[str],
                       matches: Callable[[list[str], str], bool]
                       ) -> list[str] | None:
  """The shortest '.'-suffixes of the ``chosen`` names that select all of them
  and none of ``others`` under ``matches``; None if none does (a name that is
  a '.'-suffix of another)."""
  depth = max(n.count(".") + 1 for n in chosen)
  for k in range(1, depth + 1):
    keys = sorted({_suffix(n, k) for n in chosen})
    if all(matches(keys, n) for n in chosen) and not any(
        matches(keys, n) for n in others):
      return keys
  return None


def _as_pattern_keys(keys: list[str]) -> list[str]:
  return [re.escape(k) for k in keys]


def _target_modules(names: list[str], others: list[str] | None
                    ) -> list[str] | str:
  """PEFT's ``target_modules`` for exactly the modules ``names``, given the
  ones left alone (None: unknown)."""
  if others is not None:
    short = _shortest_suffixes(names, others, _targets_module)
    if short is not None:
      return short
    # A list also picks '.'-suffixes; a string is full-matched.
    return "|".join(re.escape(n) for n in sorted(names))
  return sorted(names)


# ------------------------------------------------------------------ save


def _modules_of(delta: Any, namer: _Namer) -> list[tuple]:
  """``(module, path, adapter, batch index, part)`` per PEFT module; a kernel
  with batch axes gives one module per index, named from ``path[i,j]``; a
  kernel named with a list of ``n`` modules gives one per ``part`` ``(j,
  n)`` of its first output axis (``part`` is None otherwise). Two leaves
  under one module name are refused, naming both."""
  out = []
  for path, d in adapters(delta).items():
    batch, _, outs = d.layout.sizes(d.kernel_shape)
    if not batch:
      names = namer.names(path)
      if len(names) > 1 and outs[0] != len(names):
        raise PeftFormatError(
            f"{namer.what} names {len(names)} torch modules {names} for "
            f"{path!r}, splitting its first output axis, but that axis "
            f"(axis {d.layout.outputs[0]} of kernel shape {d.kernel_shape}, "
            f"layout {d.layout}) has {outs[0]} entries. Give it a layout whose "
            f"first output axis holds the fused projections (layouts=), or "
            f"name it as one module.")
      for j, m in enumerate(names):
        out.append((m, path, d, (), (j, len(names)) if len(names) > 1 else
                    None))
      continue
    for idx in np.ndindex(*batch):
      indexed = _indexed(path, idx)
      names = namer.names(indexed, default_ok=False)
      if not names:
        raise PeftFormatError(
            f"{path!r} has batch axes (kernel shape {d.kernel_shape}, layout "
            f"{d.layout}): it holds {math.prod(batch)} kernels (stacked "
            f"layers or experts) while PEFT has one module per kernel. Pass "
            f"module_names that maps {indexed!r} to the module of that index, "
            f"e.g. module_names=[(r'(.*)/layers/(\\w+)/kernel\\[(\\d+)\\]', "
            f"r'model.layers.\\3.\\2')].")
      if len(names) > 1:
        raise PeftFormatError(
            f"{namer.what} names {len(names)} torch modules {names} for the "
            f"stacked entry {indexed!r}; an entry of a stacked kernel is one "
            f"module.")
      out.append((names[0], path, d, idx, None))
  # Each module name belongs to one leaf: two adapters, or an adapter and
  # another leaf of the tree (a kernel left alone; a bias belongs with its
  # kernel in torch's module), under one name would put the adapter on the
  # wrong weight in PEFT.
  owner: dict[str, str] = {}
  for m, path, _, idx, _ in out:
    where = _indexed(path, idx) if idx else path
    if m in owner:
      raise PeftFormatError(
          f"{namer.what} gives the PEFT module name {m!r} to more than one "
          f"adapter ({sorted([owner[m], where])}); each torch module holds "
          f"one adapter. Fix module_names.")
    owner[m] = where
  for p, x in leaves_with_paths(delta, is_leaf=is_delta_or_none):
    if x is not None or p.rsplit("/", 1)[-1] == "bias":
      continue
    name = namer.known(p)
    if name is not None and name in owner:
      raise PeftFormatError(
          f"{namer.what} gives the PEFT module name {name!r} to the adapted "
          f"leaf {owner[name]!r} and to the leaf {p!r}; a torch module holds "
          f"one weight, so PEFT would put the adapter on the wrong one. Pass "
          f"module_names that gives each kernel its own module (a preset such "
          f"as 'tunix-qwen3', (regex, replacement) pairs or a callable).")
  return out


def _factors(d: LoraDelta, idx: tuple, part: tuple | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """PEFT's ``(lora_A (r, in), lora_B (out, r), magnitude (out,) or None)``
  of one (batch entry of an) adapter; ``part`` ``(j, n)``: the ``j``-th of
  ``n`` equal blocks of its outputs (a fused projection's module)."""
  lora_a, lora_b = d.layout.factors_to_out_in(d.a, d.b)
  g = int(np.ravel_multi_index(idx, d.layout.sizes(d.kernel_shape)[0])
          ) if idx else 0
  lora_a, lora_b = np.asarray(lora_a[g]), np.asarray(lora_b[g])
  mag = None
  if d.magnitude is not None:
    mag = np.asarray(d.magnitude).reshape(-1, lora_b.shape[0])[g]
  if part is not None:
    j, n = part
    rows = slice(j * lora_b.shape[0] // n, (j + 1) * lora_b.shape[0] // n)
    lora_b = lora_b[rows]
    mag = None if mag is None else mag[rows]
  return lora_a, lora_b, mag


def _round(x: float) -> float:
  # alpha = scale * r recomputed from a float scale: 16.000000000000004 is 16.
  return float(f"{x:.12g}")


def _alpha_of(d: LoraDelta, rslora: bool) -> float:
  r = d.rank
  return _round(d.scale * (math.sqrt(r) if rslora else r))


def _close(x: float, y: float) -> bool:
  return abs(x - y) <= 1e-9 * max(abs(x), abs(y))


def _pattern(groups: dict[Any, list[str]], default: Any, names: list[str]):
  """``{key: value}`` for modules whose value is not ``default``: per value,
  the shortest suffixes that pick its modules and no other adapted one."""
  out = {}
  for value, chosen in groups.items():
    if default is not None and _close(value, default):
      continue
    others = [n for n in names if n not in set(chosen)]
    keys = _shortest_suffixes(
        chosen, others,
        lambda ks, n: pattern_key(_as_pattern_keys(ks), n) is not None)
    # '^' stops PEFT's (.*\.)? prefix: the names themselves, nothing longer.
    keys = _as_pattern_keys(keys) if keys is not None else [
        "^" + re.escape(n) for n in sorted(chosen)]
    out["|".join(keys)] = value
  return out


def peft_config(delta: Any, config: LoraConfig, module_names: ModuleNames = None,
                fold_scales: bool = False,
                expected_modules: Sequence[str] | None = None) -> dict:
  """The ``adapter_config.json`` :func:`save_peft` writes for ``delta``.

  Args:
    delta: a delta tree (from ``split``, ``load`` ...).
    config: the :class:`lora_jax.LoraConfig` it was made with.
    module_names: as in :func:`save_peft`.
    fold_scales: as in :func:`save_peft`.
    expected_modules: as in :func:`save_peft`.

  Returns:
    The config as a dict of JSON types.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 4))},
  ...                     "k_proj": {"kernel": jnp.ones((4, 4))}}}
  >>> cfg = lj.LoraConfig(rank=2, alpha=4.0, targets=".*q_proj/kernel")
  >>> _, delta = lj.split(params, cfg, jax.random.key(0))
  >>> c = peft_config(delta, cfg)
  >>> c["r"], c["lora_alpha"], c["target_modules"]
  (2, 4, ['q_proj'])
  """
  namer = _namer(module_names)
  mods = _modules_of(delta, namer)
  if not mods:
    raise PeftFormatError("save_peft: the delta holds no adapter.")
  names = [m for m, *_ in mods]
  dora = sorted({p for _, p, d, *_ in mods if d.magnitude is not None})
  if dora and len(dora) < len({p for _, p, *_ in mods}):
    plain = sorted({p for _, p, d, *_ in mods if d.magnitude is None})
    raise PeftFormatError(
        f"save_peft: {dora[0]!r} is a DoRA adapter but {plain[0]!r} is not; "
        f"PEFT's use_dora holds for every module of an adapter. Save the two "
        f"kinds as two adapters.")
  # Every leaf path in the tree names a torch module; a delta with None slots
  # (from split) knows the modules it left alone, so target_modules can be
  # the short names (q_proj) whenever they pick exactly the adapted modules.
  slots = leaves_with_paths(delta, is_leaf=is_delta_or_none)
  has_slots = any(x is None for _, x in slots)
  others: set[str] = set()
  for p, x in slots:
    n = namer(p) if x is None else None
    others.update(v for v in (n if isinstance(n, (list, tuple)) else [n])
                  if isinstance(v, str) and v)
  if expected_modules is not None:
    # The torch model's own module names: every other one is left alone.
    expected = _expected(expected_modules)
    _check_expected(names, expected, "save_peft", namer.what)
    others, has_slots = set(expected), True
  targets = _target_modules(names, sorted(others - set(names))
                            if has_slots else None)
  by_rank: dict = {}
  by_alpha: dict = {}
  for m, _, d, *_ in mods:
    by_rank.setdefault(d.rank, []).append(m)
    by_alpha.setdefault(_alpha_of(d, config.rslora), []).append(m)
  dropouts = {d.dropout for _, _, d, *_ in mods}
  out = {
      "peft_type": "LORA",
      "r": config.rank,
      "lora_alpha": int(config.alpha) if config.alpha.is_integer() else (
          config.alpha),
      "target_modules": targets,
      "use_rslora": config.rslora,
      "use_dora": bool(dora),
      "lora_dropout": max(dropouts),
      "fan_in_fan_out": False,
      "bias": "none",
      "rank_pattern": _pattern(by_rank, config.rank, names),
      "alpha_pattern": _pattern(by_alpha, config.alpha, names),
      "modules_to_save": None,
      "init_lora_weights": True,
      "inference_mode": True,
      "base_model_name_or_path": None,
      "task_type": None,
  }
  if fold_scales:
    # One scale for every module (what vLLM applies): each module's alpha is
    # set so that alpha / r (or / sqrt(r)) is the global scale; the factor
    # by which its own scale differs is folded into lora_B by save_peft.
    root = lambda r: math.sqrt(r) if config.rslora else r
    out["alpha_pattern"] = _pattern(
        {_round(config.scale * root(r)): ms for r, ms in by_rank.items()},
        config.alpha, names)
  return out


def save_peft(directory: str | os.PathLike, delta: Any, config: LoraConfig,
              module_names: ModuleNames = None, *, fold_scales: bool = False,
              extra_config: Mapping[str, Any] | None = None,
              expected_modules: Sequence[str] | None = None) -> list[str]:
  """Writes ``delta`` as a PEFT LoRA adapter that
  ``peft.PeftModel.from_pretrained`` loads onto the equivalent torch model
  (and vLLM, TGI and LoRAX serve).

  ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
  ``(r, in)`` and ``.lora_B.weight`` ``(out, r)`` per adapter (the factors
  in their own dtype, N-D kernels flattened to torch's ``(out, in)`` view by
  the adapter's layout), and ``.lora_magnitude_vector`` ``(out,)`` with
  DoRA. ``adapter_config.json`` has ``r``, ``lora_alpha``,
  ``target_modules``, ``use_rslora``, ``use_dora``, ``lora_dropout`` and the
  ``rank_pattern`` / ``alpha_pattern`` module-name regexes that give each
  module its own rank and scale. Problems a vLLM server would have with the
  adapter (:func:`check_vllm`) are warned about.

  Args:
    directory: where to write (created if missing; the two files replaced).
    delta: a delta tree (from ``split``, ``load``, training ...).
    config: the :class:`lora_jax.LoraConfig` it was made with (its
      ``rank``, ``alpha`` and ``rslora`` become ``r``, ``lora_alpha`` and
      ``use_rslora``; each adapter's own rank and scale are kept).
    module_names: how a leaf path becomes a torch module name: a preset
      for a model family (``"tunix-qwen3"``, ``"tunix-llama3"``,
      ``"tunix-gemma3"``: tunix's NNX models to transformers' names, e.g.
      ``"layers/0/attn/q_proj/w"`` -> ``"model.layers.0.self_attn.q_proj"``;
      a leaf the preset does not name is an error; ``"transformers"``: the
      Flax ports, whose paths are torch's names), a callable, or a list of
      ``(regex, replacement)`` pairs (the first regex that full-matches the
      path gives ``match.expand(replacement)``; other paths keep the
      default). Default: drop the leaf name, join with ``.``
      (``"model/layers/0/self_attn/q_proj/kernel"`` ->
      ``"model.layers.0.self_attn.q_proj"``). A kernel with batch axes
      (stacked layers, experts) is written as one module per index, named
      from ``"<path>[i]"`` (``"<path>[i,j]"`` for two batch axes). A name
      may be a list of ``n`` names: the kernel's first output axis is split
      into ``n`` equal blocks, one module each (a fused projection, as
      Gemma's ``kv_einsum``; the same ``lora_A`` for each). Two leaves under
      one module name are an error (a leaf named ``bias`` belongs with its
      kernel).
    fold_scales: write one scale, ``lora_alpha / r``, for every module (vLLM
      ignores ``alpha_pattern``): each module's scale ratio is folded into
      its ``lora_B``, and ``alpha_pattern`` gives modules of another rank
      the alpha that keeps PEFT's scale equal. The same model either way.
    extra_config: more ``adapter_config.json`` fields, e.g.
      ``{"base_model_name_or_path": "gpt2", "task_type": "CAUSAL_LM",
      "fan_in_fan_out": True}`` (for transformers' GPT-2 ``Conv1D``; PEFT
      sets it itself with a warning). The fields that describe the weights
      cannot be overridden.
    expected_modules: optional, the torch model's module names (``[n for n,
      _ in torch_model.named_modules()]``): an exported name that is not
      one of them is an error, raised before anything is written; they also
      make ``target_modules`` exact.

  Returns:
    The problems :func:`check_vllm` found (also warned); empty if none.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile, json, os
  >>> params = {"model": {"q_proj": {"kernel": jnp.ones((8, 4))}}}
  >>> cfg = lj.LoraConfig(rank=2, alpha=4.0)
  >>> _, delta = lj.split(params, cfg, jax.random.key(0))
  >>> d = tempfile.mkdtemp()
  >>> lj.save_peft(d, delta, cfg)
  []
  >>> json.load(open(os.path.join(d, "adapter_config.json")))["target_modules"]
  ['model.q_proj']
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"save_peft expects a lora_jax.LoraConfig, got {config!r}.")
  namer = _namer(module_names)
  cfg = peft_config(delta, config, namer, fold_scales, expected_modules)
  fixed = {"peft_type", "r", "lora_alpha", "target_modules", "use_rslora",
           "use_dora", "rank_pattern", "alpha_pattern"}
  clash = sorted(fixed & set(extra_config or {}))
  if clash:
    raise ValueError(
        f"save_peft: extra_config cannot set {clash}: they describe the "
        f"weights, and save_peft writes them from the delta and config.")
  cfg.update(extra_config or {})
  tensors = {}
  for m, _, d, idx, part in _modules_of(delta, namer):
    lora_a, lora_b, mag = _factors(d, idx, part)
    if fold_scales:
      ratio = d.scale / config.scale  # PEFT and vLLM apply config.scale
      lora_b = (lora_b.astype(np.float64) * ratio).astype(lora_b.dtype)
    tensors[PREFIX + m + _A] = lora_a
    tensors[PREFIX + m + _B] = lora_b
    if mag is not None:
      tensors[PREFIX + m + _M] = mag
  os.makedirs(directory, exist_ok=True)
  safetensors.save_file(os.path.join(directory, WEIGHTS_FILE), tensors,
                        {"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  problems = check_vllm(directory)
  principal = sorted({d.residual_of.init for d in adapters(delta).values()
                      if d.residual_of is not None})
  if principal:  # the file cannot say so; PEFT and vLLM would misapply it
    problems.append(_principal_problem(principal[0]))
  if problems:
    warnings.warn(
        "save_peft: a vLLM server would not serve this adapter as written:\n- "
        + "\n- ".join(problems), UserWarning, stacklevel=2)
  return problems


# ------------------------------------------------------------------ serving


def _fold_hint() -> str:
  return ("save it with lora_jax.save_peft(..., fold_scales=True), which "
          "folds each module's scale into its lora_B")


def _config_problems(config: LoraConfig) -> list[str]:
  problems = []
  if config.dora:
    problems.append(
        "use_dora: vLLM does not serve DoRA adapters. Merge the adapter into "
        "the base (lora_jax.merge) and serve the merged weights, or train "
        "plain LoRA (LoraConfig(dora=False)).")
  if len(config.rank_pattern) or len(config.alpha_pattern):
    problems.append(
        "rank_pattern/alpha_pattern: vLLM scales every module by lora_alpha/r "
        "and ignores both patterns, so modules with their own scale would be "
        f"served wrong: {_fold_hint()}.")
  if config.init_spec.principal:
    problems.append(_principal_problem(str(config.init)))
  return problems


def _principal_problem(init: str) -> str:
  return (f"init={init!r}: the adapter belongs with the residual base that "
          f"lora_jax.split returned, but a server applies it to the original "
          f"weights. Convert it first: lora_jax.to_plain_lora(initial_delta, "
          f"delta) (rank 2r, exact on the original weights).")


def _file_problems(cfg: dict, keys: Sequence[str]) -> list[str]:
  problems = []
  if cfg.get("use_dora"):
    problems.append(
        "use_dora: vLLM does not serve DoRA adapters. Merge the adapter into "
        "the base (lora_jax.merge) and serve the merged weights, or train "
        "plain LoRA (LoraConfig(dora=False)).")
  if cfg.get("modules_to_save"):
    problems.append(
        f"modules_to_save={cfg['modules_to_save']!r}: vLLM serves "
        f"modules_to_save=None only. Merge the adapter and the saved modules "
        f"into the base and serve the merged model.")
  if cfg.get("bias", "none") != "none" or any(".lora_B.bias" in k for k in keys):
    problems.append(
        f"bias={cfg.get('bias')!r}: vLLM serves LoRA adapters without bias "
        f"terms (bias='none'). Merge the adapter into the base instead.")
  r, alpha = cfg.get("r"), cfg.get("lora_alpha")
  if isinstance(r, int) and isinstance(alpha, (int, float)) and r > 0:
    root = math.sqrt if cfg.get("use_rslora") else (lambda v: v)
    ranks = cfg.get("rank_pattern") or {}
    alphas = cfg.get("alpha_pattern") or {}
    wrong = []
    for m in sorted({k[len(PREFIX):-len(_A)] for k in keys
                     if k.startswith(PREFIX) and k.endswith(_A)}):
      rk, ak = pattern_key(list(ranks), m), pattern_key(list(alphas), m)
      rm = ranks[rk] if rk is not None else r
      am = alphas[ak] if ak is not None else alpha
      if not _close(am / root(rm), alpha / root(r)):
        wrong.append(m)
    if wrong:
      problems.append(
          f"rank_pattern/alpha_pattern: vLLM scales every module by "
          f"lora_alpha/r and ignores both patterns, so modules with their "
          f"own scale ({len(wrong)} of them, e.g. {wrong[0]!r}) would be "
          f"served wrong: {_fold_hint()}.")
  return problems


def check_vllm(adapter: LoraConfig | str | os.PathLike, *,
               expected_modules: Sequence[str] | None = None) -> list[str]:
  """What a vLLM server would reject or serve wrong in an adapter.

  vLLM rejects DoRA and ``modules_to_save`` and LoRA bias terms, and applies
  one scale ``lora_alpha / r`` to every module (ignoring ``rank_pattern`` and
  ``alpha_pattern``). Each problem comes with what to do instead.

  Args:
    adapter: a PEFT adapter directory, or a :class:`lora_jax.LoraConfig`.
    expected_modules: optional, with a directory: the serving model's module
      names (``[n for n, _ in torch_model.named_modules()]``). A module of
      the file that is not one of them is a :class:`PeftFormatError` naming
      it (the server would adapt nothing there).

  Returns:
    A list of problems, each a sentence; empty if vLLM serves it as is.

  >>> import lora_jax as lj
  >>> lj.check_vllm(lj.LoraConfig(rank=8))
  []
  >>> lj.check_vllm(lj.LoraConfig(rank=8, dora=True))[0][:38]
  'use_dora: vLLM does not serve DoRA ada'
  """
  if isinstance(adapter, LoraConfig):
    if expected_modules is not None:
      raise TypeError("check_vllm: expected_modules is checked against an "
                      "adapter directory's modules; pass the directory.")
    return _config_problems(adapter)
  cfg = _read_config(adapter)
  keys = list(_read_weights(adapter))
  if expected_modules is not None:
    modules = sorted({k[len(PREFIX):-len(s)] for k in keys for s in (_A, _B, _M)
                      if k.startswith(PREFIX) and k.endswith(s)})
    _check_expected(modules, _expected(expected_modules),
                    os.path.join(os.fspath(adapter), WEIGHTS_FILE),
                    "the file")
  return _file_problems(cfg, keys)


def _expected(expected_modules: Any) -> set[str]:
  if isinstance(expected_modules, (str, bytes)) or not all(
      isinstance(n, str) for n in expected_modules):
    raise TypeError(
        f"expected_modules must be a list of torch module names, e.g. [n for "
        f"n, _ in torch_model.named_modules()]; got {expected_modules!r:.200}.")
  return set(expected_modules)


def _check_expected(names: Sequence[str], expected: set[str], where: str,
                    source: str) -> None:
  """An error naming every module of ``names`` not in ``expected``."""
  missing = sorted(set(names) - expected)
  if not missing:
    return
  close = difflib.get_close_matches(missing[0], sorted(expected), n=1,
                                    cutoff=0.0)
  shown = ", ".join(repr(m) for m in missing[:10]) + (
      f" and {len(missing) - 10} more" if len(missing) > 10 else "")
  raise PeftFormatError(
      f"{where}: {len(missing)} of the {len(set(names))} module names from "
      f"{source} match no module of expected_modules: {shown}"
      + (f" (closest module to {missing[0]!r}: {close[0]!r})" if close else "")
      + f". PEFT would adapt nothing there. Name the modules as the torch model "
      f"does: module_names= a preset ({_preset_list()}), (regex, "
      f"replacement) pairs or a callable.")


# ------------------------------------------------------------------ load


def _read_config(directory) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise PeftFormatError(
        f"{directory}: no {CONFIG_FILE}; a PEFT adapter directory holds "
        f"{CONFIG_FILE} and {WEIGHTS_FILE}.")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise PeftFormatError(f"{path}: not readable JSON ({e}).") from None
  except RecursionError:
    raise PeftFormatError(
        f"{path}: its JSON is nested too deeply to read; an adapter config "
        f"is a flat object of fields. Write it again (PEFT's "
        f"save_pretrained, or lora_jax.save_peft).") from None
  if not isinstance(cfg, dict):
    raise PeftFormatError(f"{path}: expected a JSON object, got {cfg!r:.200}.")
  deep = safetensors.nested_too_deep(cfg)
  if deep is not None:
    raise PeftFormatError(
        f"{path}: field {deep!r} is nested more than "
        f"{safetensors.MAX_DEPTH} levels deep; an adapter config is a flat "
        f"object of fields. Write it again (PEFT's save_pretrained, or "
        f"lora_jax.save_peft).")
  return cfg


def _read_weights(directory) -> dict[str, np.ndarray]:
  path = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(path):
    pt = os.path.join(directory, "adapter_model.bin")
    extra = (" It has adapter_model.bin (pickled torch tensors), which "
             "lora_jax does not unpickle: convert it with PEFT, "
             "PeftModel.from_pretrained(model, dir).save_pretrained(out_dir, "
             "safe_serialization=True).") if os.path.isfile(pt) else ""
    raise PeftFormatError(f"{directory}: no {WEIGHTS_FILE}.{extra}")
  try:
    return safetensors.load_file(path)[0]
  except safetensors.SafetensorsError as e:
    raise PeftFormatError(f"{e} Write it again (PEFT's save_pretrained, or "
                          f"lora_jax.save_peft).") from None


def _check_fields(cfg: dict, where: str) -> None:
  kind = cfg.get("peft_type")
  if kind != "LORA":
    raise PeftFormatError(
        f"{where}: field 'peft_type' is {kind!r}; lora_jax reads LoRA "
        f"adapters only (peft_type 'LORA', with or without use_dora / "
        f"use_rslora). LoHa, LoKr, IA3, AdaLoRA and prompt methods have no "
        f"lora_jax equivalent.")
  for field, unused in _UNSUPPORTED.items():
    value = cfg.get(field)
    if not any(value == u and type(value) is type(u) for u in unused):
      raise PeftFormatError(
          f"{where}: field {field!r} is {value!r}, which lora_jax does not "
          f"support (it reads adapters whose {field} is unset). Load it in "
          f"PEFT, merge what it adds, and export a plain LoRA adapter.")
  for field, kind in (("r", int), ("lora_alpha", (int, float))):
    value = cfg.get(field)
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
      raise PeftFormatError(f"{where}: field {field!r} must be a positive "
                            f"number, got {value!r}.")
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise PeftFormatError(
        f"{where}: field 'init_lora_weights' is {init!r}: this init rewrites "
        f"the base weights, so the adapter only fits PEFT's modified base. "
        f"Save it from PEFT converted to a plain LoRA adapter on the original "
        f"weights: save_pretrained(out_dir, "
        f"path_initial_model_for_weight_conversion=<the initial adapter>).")
  if cfg.get("bias", "none") != "none":
    raise PeftFormatError(
        f"{where}: field 'bias' is {cfg['bias']!r}; lora_jax adapters train "
        f"no bias terms (bias 'none'). Merge the adapter in PEFT instead.")


def _group_keys(tensors: dict, where: str, dora: bool) -> dict[str, dict]:
  """``{module: {"A", "B"[, "M"]}}`` from the file's keys, every key
  accounted for."""
  mods: dict[str, dict] = {}
  for key in sorted(tensors):
    part = next((s for s, tag in ((_A, "A"), (_B, "B"), (_M, "M"))
                 if key.endswith(s)), None)
    if not key.startswith(PREFIX) or part is None:
      what = ("an embedding adapter (lora_embedding_A/B), which lora_jax "
              "does not map; target the embedding's linear uses instead"
              if "lora_embedding_" in key else
              "a LoRA bias (lora_bias)" if key.endswith(".lora_B.bias") else
              f"not a {PREFIX}<module>.lora_A.weight / lora_B.weight / "
              f"lora_magnitude_vector tensor")
      raise PeftFormatError(f"{where}: key {key!r} is {what}.")
    module = key[len(PREFIX):-len(part)]
    tag = {_A: "A", _B: "B", _M: "M"}[part]
    mods.setdefault(module, {})[tag] = (key, tensors[key])
  for module, parts in mods.items():
    need = {"A", "B", "M"} if dora else {"A", "B"}
    if set(parts) != need:
      missing = sorted(need - set(parts))
      extra = sorted(set(parts) - need)
      suffix = {"A": _A, "B": _B, "M": _M}
      raise PeftFormatError(
          f"{where}: module {module!r} has "
          + (f"no {', '.join(PREFIX + module + suffix[t] for t in missing)}"
             if missing else
             f"{', '.join(PREFIX + module + suffix[t] for t in extra)} but the "
             f"field 'use_dora' is false") + ".")
  if not mods:
    raise PeftFormatError(f"{where}: no LoRA tensors.")
  return mods


def _kernels(params: Any, apply_fn: Callable | None,
             example_args: Sequence[Any], layouts: PatternMap
             ) -> tuple[list[tuple[str, Any]], dict[str, Callable]]:
  """``(path, leaf)`` of every kernel of ``params`` a module can name, and
  the traced layouts. A float leaf of 2+ axes is a kernel when ``layouts``
  gives it a layout, or, with ``apply_fn``, when the trace uses it as the
  weight of a matmul, einsum or conv (or a lookup table); without
  ``apply_fn`` every other such leaf is one, except those named ``bias``
  (Flax DenseGeneral's 2-D ``(heads, head_dim)`` biases: torch keeps a
  module's bias beside its weight)."""
  from lora_jax._src import quant  # pylint: disable=g-import-not-at-top
  from lora_jax._src.discover import layout_from_uses  # pylint: disable=g-import-not-at-top
  from lora_jax._src.discover import trace_uses  # pylint: disable=g-import-not-at-top
  leaves = leaves_with_paths(params)
  floats = [(i, p, x) for i, (p, x) in enumerate(leaves) if is_float_matrix(x)]
  explicit = {p for _, p, _ in floats if layouts.lookup(p) is not None}
  if apply_fn is None or quant.has_qarrays(params):
    return [(p, x) for _, p, x in floats
            if p in explicit or p.rsplit("/", 1)[-1] != "bias"], {}
  traced = [(i, p, x) for i, p, x in floats if p not in explicit]
  uses = trace_uses(apply_fn, params, example_args, None,
                    [i for i, _, _ in traced])
  used = {p: (x, u) for (_, p, x), u in zip(traced, uses, strict=True)
          if any(use.roles is not None for use in u)}
  # The layout of each kernel from the same trace, computed only for the
  # kernels a module names (a conflict elsewhere is no concern here).
  layout_of = lambda p: layout_from_uses(p, len(used[p][0].shape), used[p][1])
  return [(p, x) for _, p, x in floats if p in explicit or p in used], (
      {p: layout_of for p in used})


def _indexed(path: str, idx: tuple) -> str:
  return f"{path}[{','.join(str(i) for i in idx)}]"


def _candidates(kernels, namer, stacked: bool) -> dict[str, list[tuple]]:
  """``{module name: [(path, index)]}``: each kernel under its own name
  (index ``()``); with ``stacked``, each entry of its leading one or two axes
  under the name ``module_names`` gives ``"<path>[i]"`` / ``"<path>[i,j]"``
  (scanned layers, experts), where it gives one of its own."""
  out: dict[str, list[tuple]] = {}
  for p, x in kernels:
    name = namer(p)
    if isinstance(name, str) and name:
      out.setdefault(name, []).append((p, ()))
    for nb in (1, 2) if stacked else ():
      if len(x.shape) < nb + 2:
        break
      for idx in np.ndindex(*x.shape[:nb]):
        indexed = _indexed(p, idx)
        name = namer(indexed)
        if isinstance(name, str) and name and name != default_module_name(
            indexed):
          out.setdefault(name, []).append((p, idx))
  return out


def _match(modules: Sequence[str], kernels, namer, stacked: bool, where: str
           ) -> dict[str, tuple[str, tuple]]:
  """``{module: (path, index)}`` for every module of the file, or an error
  naming the first module without exactly one kernel."""
  cands = _candidates(kernels, namer, False)
  if stacked and any(m not in cands for m in modules):
    cands = _candidates(kernels, namer, True)
  found = {}
  for m in modules:
    hits = cands.get(m)
    if not hits:
      close = difflib.get_close_matches(m, list(cands), n=3, cutoff=0.0)
      shown = ", ".join(
          f"{c!r} ({_indexed(*cands[c][0]) if cands[c][0][1] else cands[c][0][0]})"
          for c in close)
      raise PeftFormatError(
          f"{where}: module {m!r} matches no leaf of params (module names "
          f"come from leaf paths by module_names). Closest: {shown}. Pass "
          f"module_names=[(regex, replacement), ...] or a callable path -> "
          f"name that gives this module's kernel the name {m!r}.")
    if len(hits) > 1:
      raise PeftFormatError(
          f"{where}: module {m!r} is the name of several leaves "
          f"{[_indexed(p, i) if i else p for p, i in hits]}; pass "
          f"module_names so that only its kernel gets this name.")
    found[m] = hits[0]
  return found


def _per_kernel(found: dict, kernels, namer, where: str) -> dict[str, dict]:
  """``{path: {index: module}}``; a stacked kernel needs a module for every
  entry (one LoraDelta adapts them all)."""
  out: dict[str, dict] = {}
  for m, (p, idx) in found.items():
    out.setdefault(p, {})[idx] = m
  shapes = dict((p, x.shape) for p, x in kernels)
  for p, by_idx in out.items():
    lengths = {len(i) for i in by_idx}
    if len(lengths) > 1:
      raise PeftFormatError(
          f"{where}: {p!r} is adapted both as one module and per stacked "
          f"entry ({sorted(by_idx.values())}); module_names must name it one "
          f"way.")
    (nb,) = lengths
    want = list(np.ndindex(*shapes[p][:nb]))
    missing = [i for i in want if i not in by_idx]
    if nb and missing:
      raise PeftFormatError(
          f"{where}: {p!r} is a stack of {len(want)} kernels, but the file "
          f"has no module for {_indexed(p, missing[0])!r} "
          f"({namer(_indexed(p, missing[0]))!r}); one lora_jax adapter covers "
          f"the whole stack, so every entry needs its module.")
  return out


def load_peft(directory: str | os.PathLike, params: Any,
              module_names: ModuleNames = None, apply_fn: Callable | None = None,
              example_args: Sequence[Any] = (), *,
              layouts: Any = ()) -> tuple[Any, Any, LoraConfig]:
  """Reads a PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) onto ``params``.

  Plain LoRA, rsLoRA, DoRA, ``rank_pattern`` and ``alpha_pattern`` are
  resolved per module as PEFT does, so ``lora_jax.wrap(f)(base, delta, x)``
  computes what PEFT computes. Everything is checked before anything is
  returned: an unsupported variant names its field or key, and a module
  with no leaf names the module and the closest leaf paths.

  Args:
    directory: the adapter directory.
    params: the base parameters (e.g. a transformers Flax model's
      ``params``).
    module_names: how a leaf path becomes a torch module name (see
      :func:`save_peft`); default: drop the leaf name, join with ``.``. A
      stacked kernel (scanned layers, experts) takes one module per entry of
      its leading batch axes when ``module_names`` names ``"<path>[i]"``
      (``"<path>[i,j]"``); every entry needs its module, all of one rank and
      alpha.
    apply_fn: optional ``apply_fn(params, *example_args)``: the layouts of
      the kernels are traced from it (needed for transposed ``(out, in)``
      storage, as transformers' Flax GPT-2, and for N-D kernels).
    example_args: example inputs for ``apply_fn``.
    layouts: explicit ``{regex: lora_jax.Layout}``, as ``LoraConfig.layouts``.

  Returns:
    ``(base, delta, config)``: ``base`` is ``params``, ``delta`` has a
    :class:`lora_jax.LoraDelta` (the file's factors, in float32 or wider) at
    each adapted leaf, and ``config`` is a :class:`lora_jax.LoraConfig` that
    targets exactly those leaves with the file's ranks and alphas.

  >>> import jax, jax.numpy as jnp, lora_jax as lj, tempfile
  >>> params = {"model": {"q_proj": {"kernel": jnp.ones((8, 4))}}}
  >>> cfg = lj.LoraConfig(rank=2, alpha=4.0)
  >>> _, delta = lj.split(params, cfg, jax.random.key(0))
  >>> d = tempfile.mkdtemp(); _ = lj.save_peft(d, delta, cfg)
  >>> base, loaded, config = lj.load_peft(d, params)
  >>> bool((loaded["model"]["q_proj"]["kernel"].a == delta["model"]["q_proj"]["kernel"].a).all())
  True
  >>> config.rank, config.scale
  (2, 2.0)
  """
  from lora_jax._src.split import split  # pylint: disable=g-import-not-at-top
  where = os.fspath(directory)
  cfg = _read_config(directory)
  _check_fields(cfg, os.path.join(where, CONFIG_FILE))
  weights_file = os.path.join(where, WEIGHTS_FILE)
  dora = bool(cfg.get("use_dora", False))
  mods = _group_keys(_read_weights(directory), weights_file, dora)
  namer = _namer(module_names)
  user_layouts = PatternMap.parse(layouts, "layouts")
  kernels, traced = _kernels(params, apply_fn, example_args, user_layouts)
  found = _match(sorted(mods), kernels, namer, module_names is not None,
                 weights_file)
  per_kernel = _per_kernel(found, kernels, namer, weights_file)

  r, alpha, rslora = cfg["r"], float(cfg["lora_alpha"]), bool(
      cfg.get("use_rslora", False))
  ranks = cfg.get("rank_pattern") or {}
  alphas = cfg.get("alpha_pattern") or {}
  rank_of, alpha_of = {}, {}
  for p, by_idx in per_kernel.items():
    values = set()
    for m in by_idx.values():
      rk, ak = pattern_key(list(ranks), m), pattern_key(list(alphas), m)
      rm = int(ranks[rk]) if rk is not None else r
      am = float(alphas[ak]) if ak is not None else alpha
      key, lora_a = mods[m]["A"]
      if lora_a.ndim != 2 or lora_a.shape[0] != rm:
        raise PeftFormatError(
            f"{weights_file}: {key!r} has shape {lora_a.shape}, but "
            f"adapter_config.json gives {m!r} rank {rm} (field "
            f"{'rank_pattern' if rk is not None else 'r'}); want ({rm}, in).")
      values.add((rm, am))
    if len(values) > 1:
      raise PeftFormatError(
          f"{weights_file}: the modules of the stacked kernel {p!r} have "
          f"different (rank, alpha) {sorted(values)}; one lora_jax adapter "
          f"has one rank and one scale for its whole stack.")
    (rank_of[p], alpha_of[p]), = values
  paths = {p: p for p in per_kernel}
  exact = lambda v: {re.escape(p): v[p] for p in sorted(paths.values())}
  config = LoraConfig(
      rank=r, alpha=alpha, rslora=rslora, dora=dora,
      targets=tuple(re.escape(p) for p in sorted(paths.values())),
      dropout=float(cfg.get("lora_dropout") or 0.0), layouts=layouts,
      rank_pattern={k: v for k, v in exact(rank_of).items() if v != r},
      alpha_pattern={k: v for k, v in exact(alpha_of).items()
                     if not _close(v, alpha)})
  # split gives each adapter its layout (traced with apply_fn), rank, scale
  # and sharding; zero factors keep it cheap, the file's replace them.
  zeros = lambda key, a_shape, b_shape, dtype, fan_in: (
      jnp.zeros(a_shape, dtype), jnp.zeros(b_shape, dtype))
  # Layouts traced along with the kernels, after the explicit ones: split
  # need not trace again.
  traced_layouts = [(re.escape(p), traced[p](p)) for p in sorted(per_kernel)
                    if p in traced]
  template = LoraConfig(**{**_fields(config), "init": zeros, "layouts": (
      list(user_layouts) + traced_layouts)})
  base, delta = split(params, template, jax.random.key(0), apply_fn,
                      example_args)
  new = {p: _from_file(p, d, {i: mods[m] for i, m in per_kernel[p].items()},
                      weights_file)
         for p, d in adapters(delta).items()}
  delta = map_with_paths(lambda p, d: new.get(p, d), delta,
                         is_leaf=is_delta_or_none)
  return base, delta, config


def _fields(config: LoraConfig) -> dict:
  names = ("rank", "alpha", "targets", "exclude", "init", "rslora", "dtype",
           "layouts", "dropout", "dora", "rank_pattern", "alpha_pattern")
  return {n: getattr(config, n) for n in names}


def _put(x: np.ndarray, like: Any) -> jax.Array:
  y = jnp.asarray(x, like.dtype)
  sharding = getattr(like, "sharding", None)
  return jax.device_put(y, sharding) if sharding is not None else y


def _from_file(path: str, d: LoraDelta, parts: dict[tuple, dict],
               where: str) -> LoraDelta:
  """The adapter ``d`` (from split: layout, rank, scale) with the file's
  factors; ``parts`` maps each batch index (``()`` for a plain kernel) to
  its module's tensors."""
  lay, shape = d.layout, d.kernel_shape
  batch, ins, outs = lay.sizes(shape)
  (idx0, first), = list(parts.items())[:1]
  nb = len(idx0)
  if lay.batch != tuple(range(nb)):
    key_a = first["A"][0]
    how = (f"stacked along its leading {nb} axes" if nb else
           "as one kernel")
    raise PeftFormatError(
        f"{where}: {key_a!r} would adapt {path!r}, a kernel with batch axes "
        f"{lay.batch} (shape {shape}, layout {lay}), but module_names named "
        f"it {how}. Name each entry of its batch axes \"<path>[i]\" in "
        f"module_names (e.g. [(r'.*/(\\w+)/kernel\\[(\\d+)\\]', "
        f"r'model.layers.\\2.\\1')]), or give it a layout whose batch axes "
        f"lead (layouts=).")
  k, n = math.prod(ins), math.prod(outs)
  a_list, b_list, m_list = [], [], []
  for idx in np.ndindex(*batch):
    (key_a, lora_a), (key_b, lora_b) = parts[idx]["A"], parts[idx]["B"]
    if lora_a.shape[1] != k or lora_b.shape != (n, lora_a.shape[0]):
      raise PeftFormatError(
          f"{where}: {key_a!r} {lora_a.shape} and {key_b!r} {lora_b.shape} do "
          f"not fit {path!r} (shape {shape}, layout {lay}: in {k}, out {n}; "
          f"want ({lora_a.shape[0]}, {k}) and ({n}, {lora_a.shape[0]})). If "
          f"the kernel is stored (out, in), pass apply_fn and example_args so "
          f"its layout is traced, or layouts={{{re.escape(path)!r}: "
          f"lora_jax.Layout.transposed()}}.")
    a_list.append(lora_a)
    b_list.append(lora_b)
    if "M" in parts[idx]:
      key_m, mag = parts[idx]["M"]
      if mag.shape != (n,):
        raise PeftFormatError(
            f"{where}: {key_m!r} has shape {mag.shape}; want ({n},), one "
            f"magnitude per output of {path!r}.")
      m_list.append(mag)
  a, b = lay.factors_from_out_in(jnp.asarray(np.stack(a_list)),
                                 jnp.asarray(np.stack(b_list)), shape)
  out = d.replace(a=_put(np.asarray(a), d.a), b=_put(np.asarray(b), d.b))
  if m_list:
    out = out.replace(magnitude=_put(np.stack(m_list).reshape(*batch, *outs),
                                     d.magnitude))
  return out
