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

from collections.abc import Mapping, Sequence
import json
import math
import os
import re
from typing import Any
import warnings

import numpy as np

from lora_jax._src import safetensors
from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.peft.files import CONFIG_FILE
from lora_jax._src.peft.files import LORA_A
from lora_jax._src.peft.files import LORA_B
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
from lora_jax._src.peft.names import entry_path
from lora_jax._src.peft.names import expected_set
from lora_jax._src.peft.names import pattern_key
from lora_jax._src.peft.names import shortest_suffixes
from lora_jax._src.peft.names import target_modules
from lora_jax._src.peft.vllm import check_vllm
from lora_jax._src.peft.vllm import principal_problem


def _modules_of(delta: Any, namer: Namer) -> list[tuple]:
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
      indexed = entry_path(path, idx)
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
    where = entry_path(path, idx) if idx else path
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


def peft_config(delta: Any, config: LoraConfig, module_names: ModuleNames = None,
                fold_scales: bool = False,
                expected_modules: Sequence[str] | None = None) -> dict:
  """The ``adapter_config.json`` that :func:`save_peft` writes for ``delta``.

  Args:
    delta: a delta tree (from ``split``, ``load`` ...).
    config: the :class:`lora_jax.LoraConfig` it was made with.
    module_names: as in :func:`save_peft`.
    fold_scales: as in :func:`save_peft`.
    expected_modules: as in :func:`save_peft`.

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
    expected = expected_set(expected_modules)
    check_expected(names, expected, "save_peft", namer.what)
    others, has_slots = set(expected), True
  targets = target_modules(names, sorted(others - set(names))
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
        {round_alpha(config.scale * root(r)): ms for r, ms in by_rank.items()},
        config.alpha, names)
  return out


def save_peft(directory: str | os.PathLike, delta: Any, config: LoraConfig,
              module_names: ModuleNames = None, *, fold_scales: bool = False,
              extra_config: Mapping[str, Any] | None = None,
              expected_modules: Sequence[str] | None = None) -> list[str]:
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
    tensors[PREFIX + m + LORA_A] = lora_a
    tensors[PREFIX + m + LORA_B] = lora_b
    if mag is not None:
      tensors[PREFIX + m + MAGNITUDE] = mag
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
