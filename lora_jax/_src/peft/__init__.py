"""PyTorch PEFT's adapter format, both ways: ``save_peft``, ``load_peft`` and
the serving check ``check_vllm``.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. One module per job: ``files`` (the directory's
names and readers), ``names`` (leaf paths to torch module names, PEFT's
pattern rule), ``save``, ``load`` and ``vllm`` (what a server would refuse).
"""

from lora_jax._src.peft.files import PeftFormatError
from lora_jax._src.peft.load import load_peft
from lora_jax._src.peft.names import MODULE_NAME_PRESETS
from lora_jax._src.peft.names import ModuleNames
from lora_jax._src.peft.names import default_module_name
from lora_jax._src.peft.names import pattern_key
from lora_jax._src.peft.save import peft_config
from lora_jax._src.peft.save import save_peft
from lora_jax._src.peft.vllm import check_vllm

__all__ = [
    "MODULE_NAME_PRESETS",
    "ModuleNames",
    "PeftFormatError",
    "check_vllm",
    "default_module_name",
    "load_peft",
    "pattern_key",
    "peft_config",
    "save_peft",
]
