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
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.peft.files import CONFIG_FILE
from lora_jax._src.peft.files import LORA_A
from lora_jax._src.peft.files import LORA_B
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
    part = next((s for s, tag in ((LORA_A, "A"), (LORA_B, "B"), (MAGNITUDE, "M"))
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
    tag = {LORA_A: "A", LORA_B: "B", MAGNITUDE: "M"}[part]
    mods.setdefault(module, {})[tag] = (key, tensors[key])
  for module, parts in mods.items():
    need = {"A", "B", "M"} if dora else {"A", "B"}
    if set(parts) != need:
      missing = sorted(need - set(parts))
      extra = sorted(set(parts) - need)
      suffix = {"A": LORA_A, "B": LORA_B, "M": MAGNITUDE}
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
              layouts: Any = ()) -> tuple[Any, Any, LoraConfig]:
  """Reads a PEFT LoRA adapter directory onto ``params``.

  The directory holds ``adapter_config.json`` and
  ``adapter_model.safetensors`` (PEFT's ``save_pretrained``).

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
  _check_fields(cfg, os.path.join(where, CONFIG_FILE))
  weights_file = os.path.join(where, WEIGHTS_FILE)
  dora = bool(cfg.get("use_dora", False))
  mods = _group_keys(read_weights(directory), weights_file, dora)
  namer = as_namer(module_names)
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
  exact = lambda v: {re.escape(p): v[p] for p in sorted(per_kernel)}
  config = LoraConfig(
      rank=r, alpha=alpha, rslora=rslora, dora=dora,
      targets=tuple(re.escape(p) for p in sorted(per_kernel)),
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
  new = {p: _from_file(p, d, {i: mods[m] for i, m in per_kernel[p].items()},
                      weights_file)
         for p, d in adapters(delta).items()}
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
