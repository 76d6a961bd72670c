"""PEFT's adapter directory on disk: its file and key names, the error for
what lora_jax cannot read or write, and the readers of its two files."""

from __future__ import annotations

import json
import os

import numpy as np

from lora_jax._src import safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Suffixes of the tensors of one module in PEFT's saved state dict.
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
MAGNITUDE = ".lora_magnitude_vector"


class PeftFormatError(ValueError):
  """A PEFT adapter directory lora_jax cannot read (or a delta it cannot
  write as one); the message names the file, key or field, and the remedy.

  >>> import lora_jax as lj, tempfile
  >>> try:
  ...   lj.load_peft(tempfile.mkdtemp(), {})
  ... except lj.PeftFormatError as e:
  ...   print(str(e).split(": ", 1)[1])
  no adapter_config.json; a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors."""


def read_config(directory) -> dict:
  """``adapter_config.json`` of ``directory`` as a dict, or an error naming
  the fault."""
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


def read_weights(directory) -> dict[str, np.ndarray]:
  """``{key: array}`` of ``adapter_model.safetensors`` in ``directory``."""
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


def round_alpha(x: float) -> float:
  # alpha = scale * r recomputed from a float scale: 16.000000000000004 is 16.
  return float(f"{x:.12g}")


def close(x: float, y: float) -> bool:
  """Equal scales or alphas, up to float rounding."""
  return abs(x - y) <= 1e-9 * max(abs(x), abs(y))
