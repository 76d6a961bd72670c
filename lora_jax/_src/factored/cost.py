"""The cost model behind ``mode="auto"``: merge or factor, per consumer."""

from __future__ import annotations

import math

# Calibrated on XLA:CPU with benchmarks/sweep.py on W1's shapes (M = 1024
# tokens, 512x512 and 512x2048 kernels): the factored engine stayed faster
# than merging up to rank 256 (1.14x vs 1.29x of full fine-tuning), although
# by raw FLOPs merging is cheaper from rank ~85 on. The factored FLOPs are
# therefore weighted by 0.5, which puts the crossover near rank 340 there.
FACTORED_FLOP_WEIGHT = 0.5


def extra_flops(tokens: int, k: int, n: int, rank: int, batch: int = 1):
  """Extra FLOPs of a training step over a frozen ``(k, n)`` kernel.

  ``merge``: the weight gradient ``x^T g`` (2 M K N) plus building ``a @ b``
  and its two gradients (6 K N r per batched kernel). ``factored``: the
  low-rank branch forward and its backward (6 M r (K + N)).
  """
  merge = 2 * tokens * k * n + 6 * batch * k * n * rank
  fact = 6 * tokens * rank * (k + n)
  return {"merge": merge, "factored": fact}


def cheaper_engine(x_shape, x_contract, lora) -> str:
  """``"merge"`` or ``"factored"`` for one consumer, by the cost model."""
  batch, ins, outs = lora.layout.sizes(lora.w.shape)
  tokens = math.prod(d for i, d in enumerate(x_shape) if i not in x_contract)
  cost = extra_flops(tokens, math.prod(ins), math.prod(outs),
                     lora.a.shape[-1], math.prod(batch))
  return ("merge" if cost["merge"] < FACTORED_FLOP_WEIGHT * cost["factored"]
          else "factored")
