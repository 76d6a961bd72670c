"""Writing a delta tree as a PEFT LoRA adapter: :func:`save_peft` and the
``adapter_config.json`` it writes (:func:`peft_config`).

Per adapted module ``<m>`` the file holds
``base_model.model.<m>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
``(out, r)``, with ``delta W = scale * B @ A`` on torch's ``(out, in)``
weight; DoRA adds ``...lora_magnitude_vector`` ``(out,)``. In lora_jax's
terms ``A = a.T`` and ``B = b.T`` once an N-D kernel is flattened to its
``(out, in)`` view by its :class:`lora_jax.Layout` (transposed storage
included), so the arithmetic is exactly the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import json
import math
import os
import re
from typing import Any, NamedTuple
import warnings

import numpy as np

from lora_jax._src import safetensors
from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.peft import kinds
from lora_jax._src.peft.files import CONFIG_FILE
from lora_jax._src.peft.files import MAGNITUDE
from lora_jax._src.peft.files import PREFIX
from lora_jax._src.peft.files import WEIGHTS_FILE
from lora_jax._src.peft.files import PeftFormatError
from lora_jax._src.peft.files import close
from lora_jax._src.peft.files import round_alpha
from lora_jax._src.peft.names import ModuleNames
from lora_jax._src.peft.names import Namer
from lora_jax._src.peft.names import as_namer
from lora_jax._src.peft.names import as_pattern_keys
from lora_jax._src.peft.names import check_expected
from lora_jax._src.peft.names import embedding_selector
from lora_jax._src.peft.names import entry_path
from lora_jax._src.peft.names import expected_set
from lora_jax._src.peft.names import pattern_key
from lora_jax._src.peft.names import shortest_suffixes
from lora_jax._src.peft.names import target_modules
from lora_jax._src.peft.vllm import check_vllm
from lora_jax._src.peft.vllm import principal_problem
from lora_jax._src.tokens import TrainableTokens
from lora_jax._src.tokens import token_deltas


class Module(NamedTuple):
  """One PEFT module (or targeted parameter) of a delta: its ``name``, the
  adapter's ``path`` and ``delta``, the batch entry ``idx`` it holds (``()``:
  all), ``part`` ``(j, n)`` (the ``j``-th of ``n`` equal blocks of the first
  output axis; None: all) and its ``kind`` (:mod:`kinds`)."""

  name: str
  path: str
  delta: LoraDelta
  idx: tuple
  part: tuple | None
  kind: str


def _embedding_check(path: str, d: LoraDelta, names: list[str]) -> None:
  if d.magnitude is not None:
    raise PeftFormatError(
        f"save_peft: {path!r} is a DoRA adapter on an embedding table; PEFT's "
        f"DoRA Embedding normalises per vocabulary row, lora_jax's DoRA per "
        f"output column, so the file would mean another model. Merge it "
        f"(lora_jax.merge), or train the table without DoRA.")
  if d.layout != Layout.dense() or len(names) != 1:
    raise PeftFormatError(
        f"save_peft: {path!r} is written as a PEFT Embedding (it matches "
        f"embeddings=) but its adapter has layout {d.layout} on kernel shape "
        f"{d.kernel_shape}"
        + (f" and {len(names)} module names" if len(names) != 1 else "")
        + "; PEFT's Embedding adapts one (vocab, dim) table looked up by "
        "row (layout Layout.dense()). Leave it out of embeddings=.")


def _modules_of(delta: Any, namer: Namer, embeddings: Callable[[str], bool],
                tied_heads: Mapping[str, Any] | None = None) -> list[Module]:
  """The PEFT modules of ``delta``. A kernel named by ``module_names`` as a
  whole despite its one batch axis is a targeted parameter (experts); any
  other kernel with batch axes gives one module per entry, named from
  ``path[i,j]``; a kernel named with a list of ``n`` modules gives one per
  block of its first output axis. Two leaves under one module name are
  refused, naming both."""
  out = []
  for path, d in adapters(delta).items():
    batch, _, outs = d.layout.sizes(d.kernel_shape)
    if not batch:
      names = namer.names(path)
      kind = kinds.EMBEDDING if embeddings(path) else kinds.LINEAR
      if kind == kinds.EMBEDDING:
        _embedding_check(path, d, names)
      if len(names) > 1 and outs[0] != len(names):
        raise PeftFormatError(
            f"{namer.what} names {len(names)} torch modules {names} for "
            f"{path!r}, splitting its first output axis, but that axis "
            f"(axis {d.layout.outputs[0]} of kernel shape {d.kernel_shape}, "
            f"layout {d.layout}) has {outs[0]} entries. Give it a layout whose "
            f"first output axis holds the fused projections (layouts=), or "
            f"name it as one module.")
      for j, m in enumerate(names):
        out.append(Module(m, path, d, (), (j, len(names)) if len(names) > 1
                          else None, kind))
      for head in _heads_of(path, tied_heads, kind):
        out.append(Module(head, path, d, (), None, kinds.HEAD))
      continue
    param = namer.parameter(path)
    if param is not None:
      _param_check(path, d, param)
      out.append(Module(param, path, d, (), None, kinds.PARAM))
      continue
    for idx in np.ndindex(*batch):
      indexed = entry_path(path, idx)
      names = namer.names(indexed, default_ok=False)
      if not names:
        raise PeftFormatError(
            f"{path!r} has batch axes (kernel shape {d.kernel_shape}, layout "
            f"{d.layout}): it holds {math.prod(batch)} kernels (stacked "
            f"layers or experts) while PEFT has one module per kernel. Pass "
            f"module_names that maps {indexed!r} to the module of that index, "
            f"e.g. module_names=[(r'(.*)/layers/(\\w+)/kernel\\[(\\d+)\\]', "
            f"r'model.layers.\\3.\\2')], or that names {path!r} itself as "
            f"a stacked torch parameter (PEFT's target_parameters), e.g. "
            f"[(r'model/layers/(\\d+)/mlp/experts/(\\w+)', "
            f"r'model.layers.\\1.mlp.experts.\\2')].")
      if len(names) > 1:
        raise PeftFormatError(
            f"{namer.what} names {len(names)} torch modules {names} for the "
            f"stacked entry {indexed!r}; an entry of a stacked kernel is one "
            f"module.")
      out.append(Module(names[0], path, d, idx, None, kinds.LINEAR))
  # Each module name belongs to one leaf: two adapters, or an adapter and
  # another leaf of the tree (a kernel left alone; a bias belongs with its
  # kernel in torch's module), under one name would put the adapter on the
  # wrong weight in PEFT.
  owner: dict[str, str] = {}
  for mod in out:
    where = entry_path(mod.path, mod.idx) if mod.idx else mod.path
    if mod.name in owner:
      raise PeftFormatError(
          f"{namer.what} gives the PEFT module name {mod.name!r} to more than "
          f"one adapter ({sorted([owner[mod.name], where])}); each torch "
          f"module holds one adapter. Fix module_names.")
    owner[mod.name] = where
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


def _heads_of(path: str, tied_heads: Mapping[str, Any] | None, kind: str
              ) -> list[str]:
  """The torch modules of the output heads tied to the table ``path``."""
  heads = []
  for pattern, names in (tied_heads or {}).items():
    if re.fullmatch(pattern, path):
      heads += [names] if isinstance(names, str) else list(names)
  if heads and kind != kinds.EMBEDDING:
    raise PeftFormatError(
        f"save_peft: tied_heads names output heads {heads} for {path!r}, "
        f"which is not written as an embedding (embeddings=); a tied head "
        f"belongs to an adapted embedding table.")
  return heads


def _param_check(path: str, d: LoraDelta, param: str) -> None:
  """PEFT's ParamWrapper: one batch axis (experts), no DoRA."""
  if len(d.layout.batch) != 1 or "." not in param:
    raise PeftFormatError(
        f"save_peft: module_names names the stacked kernel {path!r} (shape "
        f"{d.kernel_shape}, layout {d.layout}) as the torch parameter "
        f"{param!r}, which PEFT's target_parameters adapts one expert per "
        f"entry of one batch axis: "
        + ("the name needs a module and a parameter, e.g. "
           "'model.layers.0.mlp.experts.gate_up_proj'." if "." not in param
           else f"this kernel has {len(d.layout.batch)} batch axes. Name "
           f"each entry \"<path>[i]\" as its own module instead."))
  if d.magnitude is not None:
    raise PeftFormatError(
        f"save_peft: {path!r} is a DoRA adapter on a stacked parameter "
        f"({param!r}); PEFT's target_parameters has no DoRA. Save it without "
        f"DoRA or name each expert as its own module.")


def _param_order(mods: list[Module], parameter_order: Sequence[str] | None
                 ) -> dict[str, str]:
  """``{parameter name: key prefix}`` for the targeted parameters: the
  ``j``-th of a module's ``n`` parameters in ``parameter_order`` (torch's
  registration order) nests under ``n-1-j`` ``.base_layer``."""
  by_module: dict[str, list[str]] = {}
  for mod in mods:
    if mod.kind == kinds.PARAM:
      module, _, short = mod.name.rpartition(".")
      by_module.setdefault(module, []).append(short)
  out = {}
  for module, shorts in by_module.items():
    if len(shorts) > 1:
      order = list(parameter_order or ())
      missing = sorted(set(shorts) - set(order))
      if missing:
        raise PeftFormatError(
            f"save_peft: the torch module {module!r} holds {len(shorts)} "
            f"adapted parameters {sorted(shorts)}; PEFT nests one wrapper per "
            f"parameter, the first registered innermost, so their keys depend "
            f"on torch's order. Pass parameter_order=[...] with every one of "
            f"them in the order the module registers them (its "
            f"named_parameters() order; GPT-OSS: ['gate_up_proj', "
            f"'down_proj']); missing: {missing}.")
      shorts = sorted(shorts, key=order.index)
    for j, short in enumerate(shorts):
      out[f"{module}.{short}"] = kinds.nested_module(module, j, len(shorts))
  return out


def _factors(mod: Module) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """The ``(lora_A, lora_B, magnitude or None)`` tensors of one module:
  Linear and Embedding ``(r, in)``, ``(out, r)``; a targeted parameter
  ``(r*E, out)``, ``(in, r*E)`` (:mod:`kinds`)."""
  d = mod.delta
  lora_a, lora_b = d.layout.factors_to_out_in(d.a, d.b)
  if mod.kind == kinds.HEAD:  # (vocab, dim) table, head (vocab, dim) weight
    if d.magnitude is not None:
      raise PeftFormatError(
          f"save_peft: {mod.path!r} is a DoRA adapter with the tied head "
          f"{mod.name!r}; PEFT ties plain LoRA factors only.")
    return np.asarray(lora_b[0]).T, np.asarray(lora_a[0]).T, None
  if mod.kind == kinds.PARAM:
    return (*kinds.param_to_peft(np.asarray(lora_a), np.asarray(lora_b)),
            None)
  g = int(np.ravel_multi_index(mod.idx, d.layout.sizes(d.kernel_shape)[0])
          ) if mod.idx else 0
  lora_a, lora_b = np.asarray(lora_a[g]), np.asarray(lora_b[g])
  mag = None
  if d.magnitude is not None:
    mag = np.asarray(d.magnitude).reshape(-1, lora_b.shape[0])[g]
  if mod.part is not None:
    j, n = mod.part
    rows = slice(j * lora_b.shape[0] // n, (j + 1) * lora_b.shape[0] // n)
    lora_b = lora_b[rows]
    mag = None if mag is None else mag[rows]
  return lora_a, lora_b, mag


def _alpha_of(d: LoraDelta, rslora: bool) -> float:
  r = d.rank
  return round_alpha(d.scale * (math.sqrt(r) if rslora else r))


def _pattern(groups: dict[Any, list[str]], default: Any, names: list[str]):
  """``{key: value}`` for modules whose value is not ``default``: per value,
  the shortest suffixes that pick its modules and no other adapted one."""
  out = {}
  for value, chosen in groups.items():
    if default is not None and close(value, default):
      continue
    others = [n for n in names if n not in set(chosen)]
    keys = shortest_suffixes(
        chosen, others,
        lambda ks, n: pattern_key(as_pattern_keys(ks), n) is not None)
    # '^' stops PEFT's (.*\.)? prefix: the names themselves, nothing longer.
    keys = as_pattern_keys(keys) if keys is not None else [
        "^" + re.escape(n) for n in sorted(chosen)]
    out["|".join(keys)] = value
  return out


def _tokens_of(delta: Any, namer: Namer
               ) -> dict[str, tuple[str, TrainableTokens]]:
  """``{module: (path, TrainableTokens)}``: each table's one module."""
  out = {}
  for path, t in token_deltas(delta).items():
    names = namer.names(path)
    if len(names) != 1:
      raise PeftFormatError(
          f"save_peft: {namer.what} names {names} for the trainable tokens of "
          f"{path!r}; an embedding table is one torch module.")
    out[names[0]] = (path, t)
  return out


def _tokens_config(tokens: dict[str, tuple[str, TrainableTokens]]) -> dict:
  """PEFT's ``TrainableTokensConfig`` for a delta of trainable tokens only:
  one list of ids for every table."""
  ids = {t.indices for _, t in tokens.values()}
  if len(ids) > 1:
    raise PeftFormatError(
        f"save_peft: the tables {sorted(p for p, _ in tokens.values())} have "
        f"different trainable token ids; PEFT's TrainableTokensConfig has one "
        f"token_indices list for all its modules. Save each table as its own "
        f"adapter, or add a LoRA adapter (then trainable_token_indices holds "
        f"the ids per module).")
  return {"peft_type": "TRAINABLE_TOKENS", "target_modules": sorted(tokens),
          "token_indices": list(ids.pop()), "init_weights": True,
          "inference_mode": True, "base_model_name_or_path": None,
          "task_type": None}


def peft_config(delta: Any, config: LoraConfig, module_names: ModuleNames = None,
                fold_scales: bool = False,
                expected_modules: Sequence[str] | None = None, *,
                embeddings: str | Sequence[str] | None = None,
                tied_heads: Mapping[str, Any] | None = None,
                parameter_order: Sequence[str] | None = None) -> dict:
  """The ``adapter_config.json`` that :func:`save_peft` writes for ``delta``.

  Args:
    delta: a delta tree (from ``split``, ``load`` ...).
    config: the :class:`lora_jax.LoraConfig` it was made with.
    module_names: as in :func:`save_peft`.
    fold_scales: as in :func:`save_peft`.
    expected_modules: as in :func:`save_peft`.
    embeddings: as in :func:`save_peft`.
    tied_heads: as in :func:`save_peft`.
    parameter_order: as in :func:`save_peft`.

  Returns:
    The config as a dict of JSON types.

  Raises:
    PeftFormatError: as :func:`save_peft`.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 4))},
    ...                     "k_proj": {"kernel": jnp.ones((4, 4))}}}
    >>> cfg = lj.LoraConfig(rank=2, alpha=4.0, targets=".*q_proj/kernel")
    >>> _, delta = lj.split(params, cfg, jax.random.key(0))
    >>> c = peft_config(delta, cfg)
    >>> c["r"], c["lora_alpha"], c["target_modules"]
    (2, 4, ['q_proj'])
  """
  namer = as_namer(module_names)
  mods = _modules_of(delta, namer, embedding_selector(embeddings),
                     tied_heads)
  tokens = _tokens_of(delta, namer)
  if not mods and not tokens:
    raise PeftFormatError("save_peft: the delta holds no adapter.")
  if expected_modules is not None and tokens:
    check_expected(sorted(tokens), expected_set(expected_modules),
                   "save_peft", namer.what)
  if not mods:
    return _tokens_config(tokens)
  _param_order(mods, parameter_order)  # the order is checked up front
  names = [mod.name for mod in mods]
  params = sorted(mod.name for mod in mods if mod.kind == kinds.PARAM)
  modules = [mod.name for mod in mods if mod.kind != kinds.PARAM]
  dora = sorted({mod.path for mod in mods if mod.delta.magnitude is not None})
  if dora and len(dora) < len({mod.path for mod in mods}):
    plain = sorted({mod.path for mod in mods if mod.delta.magnitude is None})
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
    expected = expected_set(expected_modules)
    check_expected(modules + [p.rpartition(".")[0] for p in params],
                   expected, "save_peft", namer.what)
    others, has_slots = set(expected), True
  targets = target_modules(modules, sorted(others - set(modules))
                           if has_slots else None) if modules else []
  by_rank: dict = {}
  by_alpha: dict = {}
  for mod in mods:
    by_rank.setdefault(mod.delta.rank, []).append(mod.name)
    by_alpha.setdefault(_alpha_of(mod.delta, config.rslora), []).append(
        mod.name)
  # PEFT's ParamWrapper refuses dropout; it does not change inference.
  dropouts = {0.0 if params else mod.delta.dropout for mod in mods}
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
  if params:
    out["target_parameters"] = params
  if tokens:
    out["trainable_token_indices"] = {m: list(t.indices)
                                      for m, (_, t) in tokens.items()}
  if any(mod.kind == kinds.EMBEDDING for mod in mods):
    # A tied output head reads the table lora_jax adapts, and PEFT ties its
    # adapter to the embedding's only with this field.
    out["ensure_weight_tying"] = True
  if fold_scales:
    # One scale for every module (what vLLM applies): each module's alpha is
    # set so that alpha / r (or / sqrt(r)) is the global scale; the factor
    # by which its own scale differs is folded into lora_B by save_peft.
    root = lambda r: math.sqrt(r) if config.rslora else r
    out["alpha_pattern"] = _pattern(
        {round_alpha(config.scale * root(r)): ms for r, ms in by_rank.items()},
        config.alpha, names)
  return out


def save_peft(directory: str | os.PathLike, delta: Any, config: LoraConfig,
              module_names: ModuleNames = None, *, fold_scales: bool = False,
              extra_config: Mapping[str, Any] | None = None,
              expected_modules: Sequence[str] | None = None,
              embeddings: str | Sequence[str] | None = None,
              tied_heads: Mapping[str, Any] | None = None,
              parameter_order: Sequence[str] | None = None) -> list[str]:
  """Writes ``delta`` as a PEFT LoRA adapter directory.

  ``peft.PeftModel.from_pretrained`` loads it onto the equivalent torch model
  (and vLLM, TGI and LoRAX serve it). ``adapter_model.safetensors`` holds
  ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
  ``.lora_B.weight`` ``(out, r)`` per adapter (the factors in their own
  dtype, N-D kernels flattened to torch's ``(out, in)`` view by the adapter's
  layout), and ``.lora_magnitude_vector`` ``(out,)`` with DoRA.
  ``adapter_config.json`` has ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora``, ``use_dora``, ``lora_dropout`` and the ``rank_pattern`` /
  ``alpha_pattern`` module-name regexes that give each module its own rank
  and scale. Problems a vLLM server would have with the adapter
  (:func:`check_vllm`) are warned about.

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
      kernel). A kernel with one batch axis (experts) that is named as a
      whole, e.g. ``[(r"layers/(\\d+)/mlp/experts/(\\w+)",
      r"model.layers.\\1.mlp.experts.\\2")]``, is written as PEFT's ``target_parameters``
      adapter of that torch parameter (``lora.ParamWrapper``, one rank-``r``
      adapter per expert, no DoRA).
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
    embeddings: regexes full-matched on leaf paths: the adapted tables
      looked up by row, written as PEFT's ``lora.Embedding``
      (``lora_embedding_A`` ``(r, vocab)``, ``lora_embedding_B`` ``(dim,
      r)``) with ``ensure_weight_tying`` set. Default: leaves named
      ``embedding`` (Flax ``nn.Embed``) or ``input_embedding`` (tunix).
    tied_heads: ``{table path regex: torch module name(s)}`` of the output
      heads that reuse an adapted table (``x @ table.T``, ``attend``), e.g.
      ``{"transformer/wte/embedding": "lm_head"}``: lora_jax's adapter of
      the table reaches them, so each is written as the Linear adapter
      PEFT's weight tying gives it (``lora_A = lora_embedding_B.T``,
      ``lora_B = lora_embedding_A.T``). PEFT ties a head by itself only for a
      table named ``embed_tokens`` (with ``ensure_weight_tying``); name
      every other tied head here, or PEFT's head misses the adapter.
    parameter_order: the names of a torch module's targeted parameters in
      the order the module registers them (``named_parameters()``), e.g.
      ``["gate_up_proj", "down_proj"]`` for GPT-OSS's experts. Needed when
      one module has several: PEFT nests their wrappers in that order, which
      decides their keys.

  Returns:
    The problems :func:`check_vllm` found (also warned); empty if none.

  Raises:
    TypeError: ``config`` is not a :class:`lora_jax.LoraConfig`, or
      ``module_names`` / ``expected_modules`` has the wrong type.
    ValueError: ``extra_config`` sets a field that describes the weights, or
      ``module_names`` is an unknown preset.
    PeftFormatError: the delta cannot be written as one PEFT adapter (no
      adapter; DoRA and plain adapters mixed; a leaf with no torch module
      name, or two leaves under one name; a name not in
      ``expected_modules``). Nothing is written then.

  Example:
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
  namer = as_namer(module_names)
  cfg = peft_config(delta, config, namer, fold_scales, expected_modules,
                    embeddings=embeddings, tied_heads=tied_heads,
                    parameter_order=parameter_order)
  fixed = {"peft_type", "r", "lora_alpha", "target_modules", "use_rslora",
           "use_dora", "rank_pattern", "alpha_pattern", "target_parameters",
           "trainable_token_indices", "token_indices"}
  clash = sorted(fixed & set(extra_config or {}))
  if clash:
    raise ValueError(
        f"save_peft: extra_config cannot set {clash}: they describe the "
        f"weights, and save_peft writes them from the delta and config.")
  cfg.update(extra_config or {})
  tensors = {}
  mods = _modules_of(delta, namer, embedding_selector(embeddings),
                     tied_heads)
  nested = _param_order(mods, parameter_order)
  for mod in mods:
    lora_a, lora_b, mag = _factors(mod)
    if fold_scales:
      ratio = mod.delta.scale / config.scale  # PEFT and vLLM apply this
      lora_b = (lora_b.astype(np.float64) * ratio).astype(lora_b.dtype)
    key = PREFIX + nested.get(mod.name, mod.name)
    suffix_a, suffix_b = kinds.SUFFIXES[mod.kind]
    tensors[key + suffix_a] = lora_a
    tensors[key + suffix_b] = lora_b
    if mag is not None:
      tensors[key + MAGNITUDE] = mag
  suffix = kinds.TOKENS_IN_LORA if mods else kinds.TOKENS
  for m, (_, t) in _tokens_of(delta, namer).items():
    tensors[PREFIX + m + suffix] = np.asarray(t.values)
  os.makedirs(directory, exist_ok=True)
  safetensors.save_file(os.path.join(directory, WEIGHTS_FILE), tensors,
                        {"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  problems = check_vllm(directory)
  principal = sorted({d.residual_of.init for d in adapters(delta).values()
                      if d.residual_of is not None})
  if principal:  # the file cannot say so; PEFT and vLLM would misapply it
    problems.append(principal_problem(principal[0]))
  if problems:
    warnings.warn(
        "save_peft: a vLLM server would not serve this adapter as written:\n- "
        + "\n- ".join(problems), UserWarning, stacklevel=2)
  return problems
