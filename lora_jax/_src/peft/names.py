"""Torch module names for lora_jax's leaf paths: the ``module_names``
argument (presets, ``(regex, replacement)`` pairs, callables), PEFT's
pattern-key rule, and the ``target_modules`` that pick exactly a set of
modules.

PEFT resolves ``rank_pattern`` / ``alpha_pattern`` per module name: a key
``k`` applies to module ``m`` when ``re.match(rf"(.*\\.)?({k})$", m)``, the
first such key in the dict's order winning. :func:`pattern_key` is that rule,
and both directions use it, so a file means the same in PEFT and here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import difflib
import re
from typing import Any

from lora_jax._src.paths import EMBEDDING_TABLES
from lora_jax._src.peft.files import PeftFormatError

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


class Namer:
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

  def parameter(self, path: str) -> str | None:
    """The name ``module_names`` gives a stacked kernel as a whole (a torch
    parameter such as ``...mlp.experts.gate_up_proj``), or None: no name of
    its own (the default name, or none)."""
    name = self.fn(path)
    if not isinstance(name, str) or not name or (
        self.preset is None and name == default_module_name(path)):
      return None
    return name

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


def as_namer(module_names: ModuleNames) -> Namer:
  return module_names if isinstance(module_names, Namer) else Namer(
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


def shortest_suffixes(chosen: Sequence[str], others: Sequence[str],
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


def as_pattern_keys(keys: list[str]) -> list[str]:
  return [re.escape(k) for k in keys]


def target_modules(names: list[str], others: list[str] | None
                    ) -> list[str] | str:
  """PEFT's ``target_modules`` for exactly the modules ``names``, given the
  ones left alone (None: unknown)."""
  if others is not None:
    short = shortest_suffixes(names, others, _targets_module)
    if short is not None:
      return short
    # A list also picks '.'-suffixes; a string is full-matched.
    return "|".join(re.escape(n) for n in sorted(names))
  return sorted(names)


def embedding_selector(embeddings: str | Sequence[str] | None
                       ) -> Callable[[str], bool]:
  """``path -> bool`` for :func:`save_peft`'s ``embeddings``: regexes
  full-matched on leaf paths; None: leaves named ``embedding`` (Flax
  ``nn.Embed``) or ``input_embedding`` (tunix's embedder)."""
  if embeddings is None:
    embeddings = EMBEDDING_TABLES
  patterns = [embeddings] if isinstance(embeddings, str) else list(embeddings)
  try:
    compiled = [re.compile(p) for p in patterns]
  except (TypeError, re.error) as e:
    raise TypeError(f"embeddings must be a regex or a list of regexes over "
                    f"leaf paths, got {embeddings!r} ({e}).") from None
  return lambda p: any(c.fullmatch(p) for c in compiled)


def entry_path(path: str, idx: tuple) -> str:
  """The path ``"<path>[i,j]"`` of entry ``idx`` of a stacked kernel."""
  return f"{path}[{','.join(str(i) for i in idx)}]"


def expected_set(expected_modules: Any) -> set[str]:
  if isinstance(expected_modules, (str, bytes)) or not all(
      isinstance(n, str) for n in expected_modules):
    raise TypeError(
        f"expected_modules must be a list of torch module names, e.g. [n for "
        f"n, _ in torch_model.named_modules()]; got {expected_modules!r:.200}.")
  return set(expected_modules)


def check_expected(names: Sequence[str], expected: set[str], where: str,
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
