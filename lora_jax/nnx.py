"""lora_jax.nnx: LoRA on a Flax NNX model, as an NNX module.

``import lora_jax.nnx as ljn``::

  m = ljn.apply_lora(model, config, key, *example_args, mode="auto",
                     **example_kwargs)     # model itself is left unchanged
  m(...)                                   # == model with merged weights
  delta = ljn.get_delta(m)                 # for lj.save / lj.save_peft / lj.merge
  ljn.set_delta(m, delta)                  # in place, checked leaf by leaf
  plain = ljn.merge(m)                     # the original class, weights merged

Contract, for libraries built on NNX (tunix's ``PeftTrainer`` and
``Sampler``, ``nnx.Optimizer(m, tx, wrt=nnx.LoRAParam)``):

* ``m``'s ``nnx.LoRAParam`` leaves are the LoRA factors and nothing else:
  ``a``, ``b`` (and ``magnitude`` with DoRA) of each adapted kernel, under
  ``m.lora`` at the kernel's path (``nnx.state(m, nnx.LoRAParam)`` is
  ``{"lora": {<kernel path...>: {"a", "b"[, "magnitude"]}}}``). Their shapes,
  dtypes and shardings stay fixed through training and :func:`set_delta`.
* The frozen weights are ``nnx.Param`` leaves of ``m.base_model`` (a copy of
  ``model`` sharing its immutable arrays); filters ``nnx.LoRAParam`` never
  select them, so ``wrt=nnx.LoRAParam`` / ``nnx.DiffState(0, nnx.LoRAParam)``
  train the factors only, with the gradients of :func:`lora_jax.wrap`.
* ``m(*args, **kwargs)`` and ``m.<method>(...)`` for every method of
  ``model`` (a KV-cache decode step, ``init_cache``, ...) compute what
  ``model`` with weights ``lora_jax.merge(base, delta)`` computes, through
  :func:`lora_jax.wrap` in ``mode`` (factored by default); the state the
  call mutates (caches, RNG counters, batch statistics) is written back into
  ``m.base_model``. Calls add no attribute to ``m`` (``nnx.jit``,
  ``nnx.cached_partial`` and ``nnx.graphdef`` + ``nnx.merge`` round trips
  are safe). ``inspect.signature(m.__call__)`` is ``model.__call__``'s.
* Other public attributes of ``model`` (``m.config``) read through; a
  submodule read that way (``m.layers``) is the frozen base's, without the
  adapters.
* With ``LoraConfig(dropout=p)``, ``m.lora_rngs`` (an ``nnx.Rngs``) gives
  each training call its dropout key and ``m.deterministic`` (set by
  ``m.eval()`` / ``m.train()``) turns LoRA dropout off and on.
* Not held yet (an error says so): trainable token rows
  (``LoraConfig(trainable_tokens=...)``), stacks of adapters. The factors
  carry no NNX sharding metadata: their arrays are placed like their kernels
  (as :func:`lora_jax.split` places them), but ``nnx.get_partition_spec``
  does not name their axes.
* ``jax.tree.leaves(nnx.variables(m))[0]`` is ``model``'s first leaf (NNX
  orders attributes by name; ``base_model`` sorts before ``lora``), so a
  library that takes its dtype from there sees the model's, not a float32
  factor's.
"""

from lora_jax._src.nnx_bridge import LoraModule
from lora_jax._src.nnx_bridge import apply_lora
from lora_jax._src.nnx_bridge import get_delta
from lora_jax._src.nnx_bridge import merge
from lora_jax._src.nnx_bridge import set_delta

__all__ = (
    "LoraModule",
    "apply_lora",
    "get_delta",
    "merge",
    "set_delta",
)
