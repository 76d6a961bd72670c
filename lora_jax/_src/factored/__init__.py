"""The factored engine: LoRA without materialising ``scale * a @ b``.

``factored_apply`` traces the apply function to a jaxpr and evaluates it with
every adapted kernel carried symbolically (:class:`values.Lora`: the base
kernel, both factors, the scale and a layout relative to the value's axes).

* ``views``: ops that only re-view a kernel keep it symbolic.
* ``consumers``: ops that consume it compute ``op(x, W0) + scale *
  op'(op''(x, a), b)`` in low rank, all through one skeleton.
* ``programs``: sub-programs are re-emitted through public API with the
  interpreter inside.
* ``plan``: the analyses that run before evaluation (row axes, sibling
  groups, recompute regions) and their immutable plan, per call site.
* ``siblings``: kernels reading the same input share one projection.
* ``lowrank``: the low-rank products (2-D, with a CPU-friendly backward).
* ``cost``: ``mode="auto"``'s choice between merging and factoring.
* ``segments``: runs of plain equations between the adapted matmuls, and
  (``recompute``) regions recomputed in the backward pass, are each traced
  once per structure (``jaxpr_core.equations_key``) and shared by the
  layers that repeat them.

Any other consumer gets the kernel merged (``W0 + scale * a @ b``) for that
use only; that fallback is counted, warned about once, and an error under
``strict=True``.
"""

from lora_jax._src.factored.cost import FACTORED_FLOP_WEIGHT
from lora_jax._src.factored.cost import cheaper_engine
from lora_jax._src.factored.cost import extra_flops
from lora_jax._src.factored.interpreter import factored_apply
from lora_jax._src.factored.interpreter import output_rows
from lora_jax._src.factored.rows import UNKNOWN
from lora_jax._src.factored.values import FallbackError
from lora_jax._src.factored.values import NeedsRowVmap
from lora_jax._src.factored.values import Report

__all__ = ["FACTORED_FLOP_WEIGHT", "UNKNOWN", "FallbackError", "NeedsRowVmap",
           "Report", "cheaper_engine", "extra_flops", "factored_apply",
           "output_rows"]
