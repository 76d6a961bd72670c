"""lora_jax: LoRA as a pure, functional transform for JAX and Flax.

>>> import jax, jax.numpy as jnp, lora_jax as lj
>>> params = {"fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(0))
>>> apply = lj.wrap(lambda p, x: x @ p["fc"]["kernel"] + p["fc"]["bias"])
>>> apply(base, delta, jnp.ones(8))
Array([8., 8., 8., 8.], dtype=float32)
"""

from importlib import metadata as _metadata

from lora_jax._src.checkpoint import CheckpointError
from lora_jax._src.checkpoint import checkpoint_manager
from lora_jax._src.checkpoint import load
from lora_jax._src.checkpoint import load_config
from lora_jax._src.checkpoint import load_extras
from lora_jax._src.checkpoint import load_metadata
from lora_jax._src.checkpoint import save
from lora_jax._src.combine import combine
from lora_jax._src.config import ALL_LINEAR
from lora_jax._src.config import LoraConfig
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import delta_weight
from lora_jax._src.eva import eva_init
from lora_jax._src.factored import FallbackError
from lora_jax._src.factored import Report
from lora_jax._src.inits import to_plain_lora
from lora_jax._src.layouts import Layout
from lora_jax._src.loftq import loftq
from lora_jax._src.loraplus import loraplus
from lora_jax._src.merge import dora_norms
from lora_jax._src.merge import merge
from lora_jax._src.merge import unmerge
from lora_jax._src.optim import optimizer
from lora_jax._src.optim import trainable_leaves
from lora_jax._src.optim import with_leaves
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths
from lora_jax._src.peft import PeftFormatError
from lora_jax._src.peft import check_vllm
from lora_jax._src.peft import load_peft
from lora_jax._src.peft import save_peft
from lora_jax._src.quant import QArray
from lora_jax._src.quant import dequantize
from lora_jax._src.quant import quantize
from lora_jax._src.sharding import delta_shardings
from lora_jax._src.sharding import factor_specs
from lora_jax._src.split import split
from lora_jax._src.stack import LoraStack
from lora_jax._src.stack import put
from lora_jax._src.stack import select
from lora_jax._src.stack import stack
from lora_jax._src.stack_io import load_stack
from lora_jax._src.stack_io import save_stack
from lora_jax._src.summary import describe
from lora_jax._src.summary import summary
from lora_jax._src.tokens import TrainableTokens
from lora_jax._src.wrap import explain
from lora_jax._src.wrap import wrap

try:
  __version__ = _metadata.version("lora_jax")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
  __version__ = "0+unknown"

__all__ = (
    "ALL_LINEAR",
    "CheckpointError",
    "FallbackError",
    "Layout",
    "LoraConfig",
    "LoraDelta",
    "TrainableTokens",
    "LoraStack",
    "PeftFormatError",
    "QArray",
    "Report",
    "adapters",
    "check_vllm",
    "checkpoint_manager",
    "combine",
    "delta_shardings",
    "delta_weight",
    "eva_init",
    "dequantize",
    "describe",
    "dora_norms",
    "explain",
    "factor_specs",
    "leaves_with_paths",
    "load",
    "load_config",
    "load_extras",
    "load_metadata",
    "load_peft",
    "load_stack",
    "loftq",
    "loraplus",
    "map_with_paths",
    "merge",
    "optimizer",
    "put",
    "quantize",
    "save",
    "save_peft",
    "save_stack",
    "select",
    "split",
    "stack",
    "summary",
    "to_plain_lora",
    "trainable_leaves",
    "unmerge",
    "with_leaves",
    "wrap",
)
