"""Reading a PEFT LoRA adapter onto a parameter tree: :func:`load_peft`.

Each module of the file is matched to exactly one kernel (or one entry of a
stacked kernel) by its torch module name, every field and tensor is checked,
and the adapters are built by :func:`lora_jax.split` (layouts, ranks, scales,
sharding) with the file's factors put in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import difflib
import itertools
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import quant
from lora_jax._src.config import LoraConfig
from lora_jax._src.config import PatternMap
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.discover import layout_from_uses
from lora_jax._src.discover import trace_uses
from lora_jax._src.dtypes import is_float_matrix
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.peft import kinds
from lora_jax._src.peft.files import CONFIG_FILE
from lora_jax._src.peft.files import MAGNITUDE
from lora_jax._src.peft.files import PREFIX
from lora_jax._src.peft.files import WEIGHTS_FILE
from lora_jax._src.peft.files import PeftFormatError
from lora_jax._src.peft.files import close
from lora_jax._src.peft.files import read_config
from lora_jax._src.peft.files import read_weights
from lora_jax._src.peft.names import ModuleNames
from lora_jax._src.peft.names import as_namer
from lora_jax._src.peft.names import default_module_name
from lora_jax._src.peft.names import entry_path
from lora_jax._src.peft.names import pattern_key
from lora_jax._src.split import split
from lora_jax._src.tokens import token_deltas

# adapter_config.json fields that change what the adapter computes and that
# lora_jax cannot honour, with the values that mean "not used" (PEFT's
# defaults, and what its older versions wrote). Fields that only steer
# training or initialisation (exclude_modules, eva_config ...) are ignored.
_UNSUPPORTED: dict[str, Any] = {
    "layers_to_transform": (None, []),
    "modules_to_save": (None, []),
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


def _group_keys(tensors: dict, where: str, dora: bool,
                allow_empty: bool = False
                ) -> tuple[dict[str, dict], dict[str, tuple]]:
  """``({module: {"kind", "A", "B"[, "M"]}}, {module: base weight})`` from
  the file's keys, every key accounted for. A Linear module's (and a
  targeted parameter's, nested under ``.base_layer``) tensors end in
  ``.lora_A.weight`` / ``.lora_B.weight``, an Embedding's in
  ``.lora_embedding_A`` / ``_B``; PEFT also saves an adapted embedding's
  (and its tied head's) ``<module>.base_layer.weight``."""
  mods: dict[str, dict] = {}
  bases: dict[str, tuple] = {}
  tags: list[tuple[str, str | None, str]] = [
      (s, kind, tag) for kind, pair in kinds.SUFFIXES.items()
          if kind != kinds.PARAM for s, tag in zip(pair, "AB")]
  tags.append((MAGNITUDE, None, "M"))
  for key in sorted(tensors):
    found = next(((s, kind, tag) for s, kind, tag in tags if key.endswith(s)),
                 None)
    if key.startswith(PREFIX) and key.endswith(kinds.BASE_WEIGHT):
      bases[key[len(PREFIX):-len(kinds.BASE_WEIGHT)]] = (key, tensors[key])
      continue
    if not key.startswith(PREFIX) or found is None:
      what = ("a LoRA bias (lora_bias)" if key.endswith(".lora_B.bias") else
              f"not a {PREFIX}<module>.lora_A.weight / lora_B.weight / "
              f"lora_magnitude_vector / lora_embedding_A / lora_embedding_B "
              f"tensor")
      raise PeftFormatError(f"{where}: key {key!r} is {what}.")
    suffix, kind, tag = found
    module = key[len(PREFIX):-len(suffix)]
    parts = mods.setdefault(module, {})
    parts[tag] = (key, tensors[key])
    if kind is not None:
      if parts.setdefault("kind", kind) != kind:
        raise PeftFormatError(
            f"{where}: module {module!r} has both lora_A/lora_B (Linear) and "
            f"lora_embedding_A/B (Embedding) tensors; a module is one or the "
            f"other.")
  embeds = [m for m, parts in mods.items()
            if parts.get("kind") == kinds.EMBEDDING]
  if dora and embeds:
    raise PeftFormatError(
        f"{where}: module {embeds[0]!r} is a DoRA Embedding; PEFT normalises "
        f"it per vocabulary row, lora_jax's DoRA per output column, so "
        f"lora_jax cannot compute it. Merge the adapter in PEFT instead.")
  for module, parts in mods.items():
    kind = parts.pop("kind", kinds.LINEAR)
    need = {"A", "B", "M"} if dora else {"A", "B"}
    if set(parts) != need:
      missing = sorted(need - set(parts))
      extra = sorted(set(parts) - need)
      ends = dict(zip("ABM", (*kinds.SUFFIXES[kind], MAGNITUDE)))
      raise PeftFormatError(
          f"{where}: module {module!r} has "
          + (f"no {', '.join(PREFIX + module + ends[t] for t in missing)}"
             if missing else
             f"{', '.join(PREFIX + module + ends[t] for t in extra)} but the "
             f"field 'use_dora' is false") + ".")
    parts["kind"] = kind
  if not mods and not allow_empty:
    raise PeftFormatError(f"{where}: no LoRA tensors.")
  return mods, bases


def _token_keys(tensors: dict, cfg: dict, where: str
                ) -> dict[str, tuple[str, np.ndarray, tuple]]:
  """``{key: (module, new rows, token ids)}`` of the file's trainable tokens:
  ``<m>.token_adapter.trainable_tokens_delta`` in a LoRA adapter, the ids
  from ``trainable_token_indices`` (a list, or ``{module suffix: ids}``);
  ``<m>.trainable_tokens_delta`` in a ``TRAINABLE_TOKENS`` one, the ids from
  ``token_indices``."""
  tokens_only = cfg.get("peft_type") == "TRAINABLE_TOKENS"
  field = "token_indices" if tokens_only else "trainable_token_indices"
  suffix = kinds.TOKENS if tokens_only else kinds.TOKENS_IN_LORA
  spec = cfg.get(field)
  out = {}
  for key in sorted(tensors):
    if not (key.startswith(PREFIX) and key.endswith(kinds.TOKENS)):
      continue
    if not key.endswith(suffix):
      raise PeftFormatError(
          f"{where}: key {key!r} is trainable tokens, but a "
          f"{cfg.get('peft_type')!r} adapter saves them as "
          f"<module>{suffix}.")
    module = key[len(PREFIX):-len(suffix)]
    if isinstance(spec, dict):
      ids = next((v for k, v in spec.items() if isinstance(k, str) and (
          module == k or module.endswith("." + k))), None)
    else:
      ids = spec
    values = tensors[key]
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids):
      raise PeftFormatError(
          f"{where}: key {key!r} holds trainable tokens, but the field "
          f"{field!r} ({spec!r:.200}) gives no list of token ids for "
          f"{module!r}.")
    if values.ndim != 2 or values.shape[0] != len(ids):
      raise PeftFormatError(
          f"{where}: key {key!r} has shape {values.shape}; want "
          f"({len(ids)}, dim), one row per token id of {field!r}.")
    out[key] = (module, values, tuple(ids))
  if tokens_only and not out:
    raise PeftFormatError(f"{where}: a TRAINABLE_TOKENS adapter without "
                          f"<module>{suffix} tensors.")
  # the config names tables whose rows the file does not hold: loading
  # without them would silently leave those rows as the base's
  modules = [m for m, _, _ in out.values()]
  listed = ([k for k in spec if isinstance(k, str)] if isinstance(spec, dict)
            else ["<the input embedding>"] if spec else [])
  lacking = [k for k in listed if not any(
      m == k or m.endswith("." + k) for m in modules)] if isinstance(
          spec, dict) else ([] if modules else listed)
  if lacking:
    raise PeftFormatError(
        f"{where}: the field {field!r} ({spec!r:.200}) lists trainable "
        f"tokens of {lacking}, but no key <module>{suffix} holds their rows "
        f"(the file is incomplete, or its config is not its own).")
  return out


def _tied_tokens(m: str, t: tuple, by_module: dict, whole: dict) -> bool:
  """Whether ``m`` holds a tied head's copy of another module's trainable
  tokens (PEFT's TrainableTokensConfig saves one): no kernel has its name,
  and the rows and ids equal those of a module that has one."""
  return m not in whole and any(
      o != m and o in whole and t[2] == u[2] and np.array_equal(t[1], u[1])
      for o, u in by_module.items())


def _parameters(mods: dict[str, dict], cfg: dict, cands: dict[str, list],
                parameter_order: Sequence[str] | None, where: str
                ) -> dict[str, dict]:
  """``mods`` with the modules of PEFT's ``target_parameters`` renamed to
  the parameter each holds (``<module>.<parameter>``, kind ``param``). A
  module's ``n`` targeted parameters nest, the first registered innermost:
  the one under ``j`` ``.base_layer`` is the ``(n-1-j)``-th in
  ``parameter_order``; without it, the order whose shapes fit, if only one
  does. ``cands``: ``{name: [kernel shape]}`` of the kernels named as a
  whole."""
  targets = [t for t in cfg.get("target_parameters") or () if isinstance(
      t, str)]
  if not targets:
    return mods
  out: dict[str, dict] = {}
  nests: dict[str, dict[int, str]] = {}
  for m, parts in mods.items():
    base = m.replace(kinds.BASE_LAYER, "")
    shorts = sorted({t.rpartition(".")[2] for t in targets
                     if _targets_parameter(t, base)})
    if not shorts or parts["kind"] != kinds.LINEAR:
      out[m] = parts
      continue
    nests.setdefault(base, {})[m.count(kinds.BASE_LAYER)] = m
  for base, by_depth in sorted(nests.items()):
    shorts = sorted({t.rpartition(".")[2] for t in targets
                     if _targets_parameter(t, base)})
    # The parameters that hold an adapter are those with a kernel.
    held = [s for s in shorts if f"{base}.{s}" in cands] or shorts
    n = len(by_depth)
    if sorted(by_depth) != list(range(n)) or n > len(held):
      raise PeftFormatError(
          f"{where}: the targeted parameters of {base!r} are saved at "
          f"nesting depths {sorted(by_depth)} (.base_layer counts) but "
          f"{len(held)} of target_parameters' parameters ({held}) have a "
          f"kernel here; PEFT nests exactly one wrapper per parameter. Pass "
          f"module_names that names each stacked kernel "
          f"'{base}.<parameter>'.")
    orders = ([sorted(held, key=list(parameter_order).index)]
              if parameter_order is not None and set(held) <= set(
                  parameter_order) else
              [list(o) for o in itertools.permutations(held, n)])
    # One possible order is taken as is (a misfit is then a shape error
    # naming the tensors); among several, the shapes decide.
    fits = orders if len(orders) == 1 else [o for o in orders if all(
        _param_fits(mods[by_depth[n - 1 - j]], cands.get(f"{base}.{s}"))
        for j, s in enumerate(o))]
    if len(fits) != 1:
      raise PeftFormatError(
          f"{where}: cannot tell which of {base!r}'s targeted parameters "
          f"{held} each nesting depth holds ("
          + ("no order fits their kernels' shapes" if not fits else
             f"{len(fits)} orders fit their kernels' shapes")
          + "). Pass parameter_order=[...] in the order the torch module "
          "registers them (named_parameters(); GPT-OSS: ['gate_up_proj', "
          "'down_proj']): the first is the innermost (most .base_layer).")
    for j, s in enumerate(fits[0]):
      out[f"{base}.{s}"] = {**mods[by_depth[n - 1 - j]], "kind": kinds.PARAM}
  return out


def _targets_parameter(target: str, module: str) -> bool:
  # PEFT's rule: the parameter's full name is the target or ends with it.
  key = f"{module}.{target.rpartition('.')[2]}"
  return key == target or key.endswith("." + target)


def _param_fits(parts: dict, shapes: list | None) -> bool:
  """Whether ParamWrapper tensors fit the one 3-D kernel named for them:
  ``lora_A`` ``(r*E, d2)``, ``lora_B`` ``(d1, r*E)`` for ``(E, d1, d2)``
  (or ``(E, d2, d1)`` stored transposed)."""
  if not shapes or len(shapes) != 1 or len(shapes[0]) != 3:
    return False
  (_, lora_a), (_, lora_b) = parts["A"], parts["B"]
  e, d1, d2 = shapes[0]
  return (lora_a.ndim == 2 and lora_b.ndim == 2 and lora_a.shape[0] % e == 0
          and lora_b.shape[1] == lora_a.shape[0]
          and sorted((lora_a.shape[1], lora_b.shape[0])) == sorted((d1, d2)))


def _kernels(params: Any, apply_fn: Callable | None,
             example_args: Sequence[Any], layouts: PatternMap
             ) -> tuple[list[tuple[str, Any]], dict[str, Callable],
                        dict[str, list]]:
  """``(path, leaf)`` of every kernel of ``params`` a module can name, the
  traced layouts and the traced uses. A float leaf of 2+ axes is a kernel when ``layouts``
  gives it a layout, or, with ``apply_fn``, when the trace uses it as the
  weight of a matmul, einsum or conv (or a lookup table); without
  ``apply_fn`` every other such leaf is one, except those named ``bias``
  (Flax DenseGeneral's 2-D ``(heads, head_dim)`` biases: torch keeps a
  module's bias beside its weight)."""
  leaves = leaves_with_paths(params)
  floats = [(i, p, x) for i, (p, x) in enumerate(leaves) if is_float_matrix(x)]
  explicit = {p for _, p, _ in floats if layouts.lookup(p) is not None}
  if apply_fn is None or quant.has_qarrays(params):
    return [(p, x) for _, p, x in floats
            if p in explicit or p.rsplit("/", 1)[-1] != "bias"], {}, {}
  traced = [(i, p, x) for i, p, x in floats if p not in explicit]
  uses = trace_uses(apply_fn, params, example_args, None,
                    [i for i, _, _ in traced])
  used = {p: (x, u) for (_, p, x), u in zip(traced, uses, strict=True)
          if any(use.roles is not None for use in u)}
  # The layout of each kernel from the same trace, computed only for the
  # kernels a module names (a conflict elsewhere is no concern here).
  layout_of = lambda p: layout_from_uses(p, len(used[p][0].shape), used[p][1])
  return [(p, x) for _, p, x in floats if p in explicit or p in used], (
      {p: layout_of for p in used}), {p: u for p, (_, u) in used.items()}


def _tied_copies(mods: dict[str, dict], whole: dict) -> dict[str, str]:
  """``{head module: embedding module}``: the Linear adapters of the file
  that copy an embedding adapter onto a tied output head, as PEFT's weight
  tying (``ensure_weight_tying``) and ``save_peft(tied_heads=)`` write them:
  ``lora_A = lora_embedding_B.T`` and ``lora_B = lora_embedding_A.T``, the
  same delta of the one table. A head with a kernel of its own (an untied
  model) is not one."""
  embeds = {m: p for m, p in mods.items() if p["kind"] == kinds.EMBEDDING}
  copies = {}
  for m, parts in mods.items():
    if parts["kind"] != kinds.LINEAR or m in whole or "M" in parts:
      continue
    lora_a, lora_b = parts["A"][1], parts["B"][1]
    for e, emb in embeds.items():
      if np.array_equal(lora_a, emb["B"][1].T) and np.array_equal(
          lora_b, emb["A"][1].T):
        copies[m] = e
  return copies


def _check_embeddings(mods: dict, copies: dict, bases: dict, found: dict,
                      leaf_of: dict, uses: dict, cfg: dict, traced: bool,
                      where: str) -> None:
  """An embedding adapter means in lora_jax what it means in PEFT.

  lora_jax adapts the table, so a tied output head (the table used as ``x @
  table.T``) sees the adapter. PEFT's head does when the file holds its
  copy of the adapter (:func:`_tied_copies`), or with
  ``ensure_weight_tying`` on a table named ``embed_tokens``; otherwise the
  table must not be a tied head in ``apply_fn``. The base weights PEFT
  saves beside an adapted embedding and its tied head
  (``<module>.base_layer.weight``) must be the table of ``params``: PEFT
  loads them into its model."""
  tying = cfg.get("ensure_weight_tying") is True
  for m, parts in sorted(mods.items()):
    if parts["kind"] != kinds.EMBEDDING:
      continue
    path, idx = found[m]
    if idx:
      raise PeftFormatError(
          f"{where}: the Embedding module {m!r} names an entry "
          f"{entry_path(path, idx)!r} of a stacked kernel; an embedding "
          f"adapter needs its own (vocab, dim) table.")
    if m in copies.values() or (
        tying and m.rsplit(".", 1)[-1] in kinds.TIED_BY_PEFT):
      continue  # a tied head in PEFT sees it, as in lora_jax
    u = uses.get(path)
    if u is None:
      raise PeftFormatError(
          f"{where}: {m!r} is an embedding adapter that PEFT applies to the "
          f"lookup only (no tied head's copy in the file, and no "
          f"ensure_weight_tying on an embed_tokens table), while lora_jax's "
          f"adapter of {path!r} reaches every use of the table. Pass apply_fn "
          f"and example_args so that load_peft can tell whether the table is "
          f"also a tied output head"
          + (" (its layout is explicit, so it is not traced: drop it from "
             "layouts=)." if traced else "."))
    if any(x.primitive != "gather" and x.roles is not None for x in u):
      raise PeftFormatError(
          f"{where}: {m!r} is an embedding adapter that PEFT applies to the "
          f"lookup only (no tied head's copy in the file), but apply_fn also "
          f"uses {path!r} as a tied output head "
          f"({', '.join(sorted({x.primitive for x in u}))}), which sees "
          f"lora_jax's adapter of the table. Save it from PEFT with "
          f"LoraConfig(ensure_weight_tying=True) on a model whose head is "
          f"tied, or untie the head.")
  for m, (key, weight) in sorted(bases.items()):
    emb = m if m in mods and mods[m]["kind"] == kinds.EMBEDDING else (
        copies.get(m))
    if emb is None:
      raise PeftFormatError(
          f"{where}: key {key!r} holds base weights of {m!r}, which is not "
          f"an adapted embedding or its tied head; lora_jax reads LoRA "
          f"tensors and an adapted embedding's base weights only. Merge them "
          f"in PEFT instead.")
    table = leaf_of[found[emb][0]]
    narrow = min((np.dtype(weight.dtype), np.dtype(table.dtype)),
                 key=lambda t: t.itemsize)
    same = weight.shape == table.shape and np.array_equal(
        np.asarray(weight).astype(narrow), np.asarray(table).astype(narrow))
    if not same:
      raise PeftFormatError(
          f"{where}: key {key!r} ({weight.dtype}{list(weight.shape)}) holds "
          f"base weights of {m!r} that differ from params' "
          f"{found[emb][0]!r} ({table.dtype}{list(table.shape)}); PEFT loads "
          f"them into its model (a resized or retrained table). Load the "
          f"same base weights into params.")


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
        indexed = entry_path(p, idx)
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
          f"{c!r} ({entry_path(*cands[c][0]) if cands[c][0][1] else cands[c][0][0]})"
          for c in close)
      raise PeftFormatError(
          f"{where}: module {m!r} matches no leaf of params (module names "
          f"come from leaf paths by module_names). Closest: {shown}. Pass "
          f"module_names=[(regex, replacement), ...] or a callable path -> "
          f"name that gives this module's kernel the name {m!r}.")
    if len(hits) > 1:
      raise PeftFormatError(
          f"{where}: module {m!r} is the name of several leaves "
          f"{[entry_path(p, i) if i else p for p, i in hits]}; pass "
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
          f"has no module for {entry_path(p, missing[0])!r} "
          f"({namer(entry_path(p, missing[0]))!r}); one lora_jax adapter covers "
          f"the whole stack, so every entry needs its module.")
  return out


def load_peft(directory: str | os.PathLike, params: Any,
              module_names: ModuleNames = None, apply_fn: Callable | None = None,
              example_args: Sequence[Any] = (), *,
              layouts: Any = (),
              parameter_order: Sequence[str] | None = None
              ) -> tuple[Any, Any, LoraConfig]:
  """Reads a PEFT LoRA adapter directory onto ``params``.

  The directory holds ``adapter_config.json`` and
  ``adapter_model.safetensors`` (PEFT's ``save_pretrained``).

  Plain LoRA, rsLoRA, DoRA, ``rank_pattern`` and ``alpha_pattern``,
  embedding adapters (``lora_embedding_A``/``B``, tied output heads
  included) and ``target_parameters`` (experts) are resolved per module as
  PEFT does, so ``lora_jax.wrap(f)(base, delta, x)``
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
    parameter_order: for PEFT's ``target_parameters`` (stacked expert
      parameters, read onto the kernel ``module_names`` names
      ``"<module>.<parameter>"``, e.g. ``[(r"layers/(\\d+)/mlp/experts/"
      r"(\\w+)", r"model.layers.\\1.mlp.experts.\\2")]``): the parameters of one torch module in the
      order it registers them (``["gate_up_proj", "down_proj"]`` for
      GPT-OSS), which decides which nested ``.base_layer`` holds which.
      Without it, the one order whose shapes fit.

  Returns:
    ``(base, delta, config)``: ``base`` is ``params``, ``delta`` has a
    :class:`lora_jax.LoraDelta` (the file's factors, in float32 or wider) at
    each adapted leaf, and ``config`` is a :class:`lora_jax.LoraConfig` that
    targets exactly those leaves with the file's ranks and alphas.

  Raises:
    PeftFormatError: a file is missing or malformed; a field or key names a
      variant lora_jax does not support; a module matches no kernel, or
      several; a tensor's shape does not fit its kernel. Each message names
      the file, field or key and the remedy.
    TypeError, ValueError: ``module_names`` or ``layouts`` is malformed.

  Example:
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
  where = os.fspath(directory)
  cfg = read_config(directory)
  tokens_only = cfg.get("peft_type") == "TRAINABLE_TOKENS"
  if not tokens_only:
    _check_fields(cfg, os.path.join(where, CONFIG_FILE))
  weights_file = os.path.join(where, WEIGHTS_FILE)
  dora = bool(cfg.get("use_dora", False))
  tensors = read_weights(directory)
  tokens = _token_keys(tensors, cfg, weights_file)
  mods, bases = _group_keys(
      {k: v for k, v in tensors.items() if k not in tokens}, weights_file,
      dora, allow_empty=bool(tokens))
  namer = as_namer(module_names)
  user_layouts = PatternMap.parse(layouts, "layouts")
  kernels, traced, uses = _kernels(params, apply_fn, example_args,
                                   user_layouts)
  leaf_of = dict(kernels)
  whole = {n: [tuple(leaf_of[p].shape) for p, i in hits if not i]
           for n, hits in _candidates(kernels, namer, False).items()}
  mods = _parameters(mods, cfg, whole, parameter_order, weights_file)
  copies = _tied_copies(mods, whole)
  mods = {m: parts for m, parts in mods.items() if m not in copies}
  found = _match(sorted(mods), kernels, namer, module_names is not None,
                 weights_file)
  per_kernel = _per_kernel(found, kernels, namer, weights_file)
  by_module = {m: (k, v, ids) for k, (m, v, ids) in tokens.items()}
  by_module = {m: t for m, t in by_module.items() if not _tied_tokens(
      m, t, by_module, whole)}
  token_paths = {_match([m], kernels, namer, False, weights_file)[m][0]: t
                 for m, t in sorted(by_module.items())}
  _check_embeddings(mods, copies, bases, found, leaf_of, uses, cfg,
                    apply_fn is not None, weights_file)

  # A TRAINABLE_TOKENS file has no rank: LoraConfig's defaults.
  r, alpha = (8, 16.0) if tokens_only else (cfg["r"], float(cfg["lora_alpha"]))
  rslora = bool(cfg.get("use_rslora", False))
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
      # A targeted parameter (E, d1, d2) holds E rank-r adapters.
      rows = rm * (leaf_of[p].shape[0] if mods[m]["kind"] == kinds.PARAM
                   else 1)
      if lora_a.ndim != 2 or lora_a.shape[0] != rows:
        raise PeftFormatError(
            f"{weights_file}: {key!r} has shape {lora_a.shape}, but "
            f"adapter_config.json gives {m!r} rank {rm} (field "
            f"{'rank_pattern' if rk is not None else 'r'}); want ({rows}, "
            f"in).")
      values.add((rm, am))
    if len(values) > 1:
      raise PeftFormatError(
          f"{weights_file}: the modules of the stacked kernel {p!r} have "
          f"different (rank, alpha) {sorted(values)}; one lora_jax adapter "
          f"has one rank and one scale for its whole stack.")
    (rank_of[p], alpha_of[p]), = values
  exact = lambda v: {re.escape(p): v[p] for p in sorted(per_kernel)}
  # A file of trainable tokens only targets nothing: its tables, excluded.
  targets = tuple(re.escape(p) for p in sorted(per_kernel or token_paths))
  config = LoraConfig(
      rank=r, alpha=alpha, rslora=rslora, dora=dora, targets=targets,
      exclude=None if per_kernel else targets,
      trainable_tokens={re.escape(p): ids
                        for p, (_, _, ids) in sorted(token_paths.items())},
      dropout=float(cfg.get("lora_dropout") or 0.0), layouts=layouts,
      rank_pattern={k: v for k, v in exact(rank_of).items() if v != r},
      alpha_pattern={k: v for k, v in exact(alpha_of).items()
                     if not close(v, alpha)})
  # split gives each adapter its layout (traced with apply_fn), rank, scale
  # and sharding; zero factors keep it cheap, the file's replace them.
  zeros = lambda key, a_shape, b_shape, dtype, fan_in: (
      jnp.zeros(a_shape, dtype), jnp.zeros(b_shape, dtype))
  # Layouts traced along with the kernels, after the explicit ones: split
  # need not trace again.
  traced_layouts = [(re.escape(p), traced[p](p)) for p in sorted(per_kernel)
                    if p in traced]
  template = dataclasses.replace(
      config, init=zeros, layouts=list(user_layouts) + traced_layouts)
  base, delta = split(params, template, jax.random.key(0), apply_fn,
                      example_args)
  new: dict[str, Any] = {
      p: _from_file(p, d, {i: mods[m] for i, m in per_kernel[p].items()},
                    weights_file)
      for p, d in adapters(delta).items()}
  for p, t in token_deltas(delta).items():
    key, rows, _ = token_paths[p]
    if rows.shape != tuple(t.values.shape):
      raise PeftFormatError(
          f"{weights_file}: {key!r} has shape {rows.shape}, but {p!r} is a "
          f"table of shape {t.kernel_shape}; want {tuple(t.values.shape)}.")
    new[p] = t.replace(values=_put(rows, t.values))
  delta = map_with_paths(lambda p, d: new.get(p, d), delta,
                         is_leaf=is_delta_or_none)
  return base, delta, config


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
  if first["kind"] == kinds.PARAM:
    return _param_from_file(path, d, first, where)
  if first["kind"] == kinds.EMBEDDING and lay != Layout.dense():
    raise PeftFormatError(
        f"{where}: {first['A'][0]!r} is an embedding adapter (vocab, dim), "
        f"but {path!r} (shape {shape}) has layout {lay}; an embedding table "
        f"is looked up by row, Layout.dense(). Pass apply_fn so its layout "
        f"is traced, or layouts={{{re.escape(path)!r}: "
        f"lora_jax.Layout.dense()}}.")
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


def _param_from_file(path: str, d: LoraDelta, parts: dict, where: str
                     ) -> LoraDelta:
  """``d`` with the factors of PEFT's ParamWrapper tensors (:mod:`kinds`)
  for a kernel with one leading batch axis (experts)."""
  lay, shape = d.layout, d.kernel_shape
  (key_a, peft_a), (key_b, peft_b) = parts["A"], parts["B"]
  if lay.batch != (0,) or len(shape) != 3:
    raise PeftFormatError(
        f"{where}: {key_a!r} is PEFT's target_parameters adapter of a "
        f"stacked parameter (experts, d1, d2), but {path!r} has shape "
        f"{shape} and layout {lay}; give it a layout with the experts on "
        f"axis 0 (layouts={{{re.escape(path)!r}: lora_jax.Layout((0,), (1,), "
        f"(2,))}}).")
  experts, (k,), (n,) = shape[0], *lay.sizes(shape)[1:]
  r = d.rank
  if peft_a.shape != (r * experts, n) or peft_b.shape != (k, r * experts):
    raise PeftFormatError(
        f"{where}: {key_a!r} {peft_a.shape} and {key_b!r} {peft_b.shape} do "
        f"not fit {path!r} (shape {shape}, layout {lay}: {experts} experts, "
        f"in {k}, out {n}, rank {r}; want ({r * experts}, {n}) and ({k}, "
        f"{r * experts})).")
  lora_a, lora_b = kinds.param_from_peft(peft_a, peft_b, experts)
  a, b = lay.factors_from_out_in(jnp.asarray(lora_a), jnp.asarray(lora_b),
                                 shape)
  return d.replace(a=_put(np.asarray(a), d.a), b=_put(np.asarray(b), d.b))
