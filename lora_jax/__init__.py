"""lora_jax: LoRA as a pure, functional transform for JAX and Flax.

>>> import jax, jax.numpy as jnp, lora_jax as lj
>>> params = {"fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(0))
>>> apply = lj.wrap(lambda p, x: x @ p["fc"]["kernel"] + p["fc"]["bias"])
>>> apply(base, delta, jnp.ones(8))
Array([8., 8., 8., 8.], dtype=float32)
"""

from lora_jax.checkpoint import (CheckpointError, checkpoint_manager, load,
                                 load_extras,
                                 load_metadata, save)
from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.delta import LoraDelta, delta_weight
from lora_jax.delta import deltas_by_path as adapters
from lora_jax.layouts import Layout
from lora_jax.merge import dora_norms, merge, unmerge
from lora_jax.optim import optimizer, trainable_leaves, with_leaves
from lora_jax.inits import to_plain_lora
from lora_jax.sharding import delta_shardings, factor_specs
from lora_jax.split import split
from lora_jax.summary import describe, summary
from lora_jax.wrap import explain, wrap
from lora_jax.factored import FallbackError, Report

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR", "CheckpointError", "Layout", "LoraConfig", "LoraDelta",
    "adapters",
    "checkpoint_manager", "delta_weight", "describe", "dora_norms", "load",
    "load_metadata",
    "explain", "merge", "optimizer", "save", "split", "summary", "unmerge",
    "wrap", "FallbackError", "Report", "to_plain_lora", "load_extras",
    "trainable_leaves", "with_leaves", "delta_shardings", "factor_specs",
]
