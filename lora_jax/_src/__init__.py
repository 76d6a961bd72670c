"""lora_jax's implementation. Private: import names from ``lora_jax``."""
