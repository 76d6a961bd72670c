"""What a vLLM server would reject or serve wrong in a PEFT adapter
(:func:`check_vllm`), each problem with its remedy."""

from __future__ import annotations

from collections.abc import Sequence
import math
import os

from lora_jax._src.config import LoraConfig
from lora_jax._src.peft import kinds
from lora_jax._src.peft.files import LORA_A
from lora_jax._src.peft.files import PREFIX
from lora_jax._src.peft.files import WEIGHTS_FILE
from lora_jax._src.peft.files import close
from lora_jax._src.peft.files import read_config
from lora_jax._src.peft.files import read_weights
from lora_jax._src.peft.names import check_expected
from lora_jax._src.peft.names import expected_set
from lora_jax._src.peft.names import pattern_key

_DORA = ("use_dora: vLLM does not serve DoRA adapters. Merge the adapter into "
         "the base (lora_jax.merge) and serve the merged weights, or train "
         "plain LoRA (LoraConfig(dora=False)).")


def _scales_problem(which: str) -> str:
  return ("rank_pattern/alpha_pattern: vLLM scales every module by "
          "lora_alpha/r and ignores both patterns, so modules with their own "
          f"scale{which} would be served wrong: save it with "
          "lora_jax.save_peft(..., fold_scales=True), which folds each "
          "module's scale into its lora_B.")


def _config_problems(config: LoraConfig) -> list[str]:
  problems = []
  if config.dora:
    problems.append(_DORA)
  if len(config.rank_pattern) or len(config.alpha_pattern):
    problems.append(_scales_problem(""))
  if config.init_spec.principal:
    problems.append(principal_problem(str(config.init)))
  return problems


def principal_problem(init: str) -> str:
  """The problem of an adapter made with a base-changing init."""
  return (f"init={init!r}: the adapter belongs with the residual base that "
          f"lora_jax.split returned, but a server applies it to the original "
          f"weights. Convert it first: lora_jax.to_plain_lora(initial_delta, "
          f"delta) (rank 2r, exact on the original weights).")


def _file_problems(cfg: dict, keys: Sequence[str]) -> list[str]:
  problems = []
  if cfg.get("use_dora"):
    problems.append(_DORA)
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
    for m in sorted({k[len(PREFIX):-len(LORA_A)] for k in keys
                     if k.startswith(PREFIX) and k.endswith(LORA_A)}):
      rk, ak = pattern_key(list(ranks), m), pattern_key(list(alphas), m)
      rm = ranks[rk] if rk is not None else r
      am = alphas[ak] if ak is not None else alpha
      if not close(am / root(rm), alpha / root(r)):
        wrong.append(m)
    if wrong:
      problems.append(_scales_problem(
          f" ({len(wrong)} of them, e.g. {wrong[0]!r})"))
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

  Raises:
    PeftFormatError: the directory is not a readable PEFT adapter, or a
      module of its file is not one of ``expected_modules``.
    TypeError: ``expected_modules`` with a config, or not a list of names.

  Example:
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
  cfg = read_config(adapter)
  keys = list(read_weights(adapter))
  if expected_modules is not None:
    modules = sorted({m for m in (kinds.module_of_key(k, PREFIX) for k in keys)
                      if m is not None})
    check_expected(modules, expected_set(expected_modules),
                    os.path.join(os.fspath(adapter), WEIGHTS_FILE),
                    "the file")
  return _file_problems(cfg, keys)
