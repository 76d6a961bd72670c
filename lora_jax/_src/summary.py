"""summary / describe: what a user prints to see what LoRA did to a model."""

from __future__ import annotations

import math
from typing import Any

import jax

from lora_jax._src.config import selects
from lora_jax._src.delta import adapters
from lora_jax._src.delta import describe_array
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.stack import stacks
from lora_jax._src.tokens import token_deltas


def _size(x: Any) -> int:
  return math.prod(getattr(x, "shape", ()))


def _nbytes(x: Any) -> int:
  return _size(x) * getattr(getattr(x, "dtype", None), "itemsize", 0)


def describe(delta: Any) -> str:
  """One line per adapter: path, kernel shape, rank, scale, factor shapes.

  Args:
    delta: a delta tree, single adapters or stacks.

  Returns:
    The lines, joined by newlines.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> _, delta = lj.split({"fc": {"kernel": jnp.ones((8, 4))}},
  ...                     lj.LoraConfig(rank=2), jax.random.key(0))
  >>> print(lj.describe(delta))
  fc/kernel  kernel (8, 4)  rank 2  scale 8  a f32[8,2]  b f32[2,4]
  >>> print(lj.describe(lj.stack([delta, delta])))
  fc/kernel  kernel (8, 4)  stack of 2, ranks 2,2  scales 8,8  a f32[2,8,2]  b f32[2,2,4]
  """
  rows = [(path, f"kernel {d.kernel_shape}", f"rank {d.rank}",
           f"scale {d.scale:g}", f"a {describe_array(d.a)}",
           f"b {describe_array(d.b)}")
          for path, d in adapters(delta).items()]
  # a stack (lj.stack) of n adapters: "stack of n", each adapter's rank
  rows += [(path, f"kernel {s.kernel_shape}",
            f"stack of {s.size}, ranks {','.join(map(str, s.info.ranks))}",
            "scales " + ",".join(f"{v:g}" for v in s.scale),
            f"a {describe_array(s.a)}", f"b {describe_array(s.b)}")
           for path, s in stacks(delta).items()]
  rows += [(path, f"table {t.kernel_shape}", f"{len(t.indices)} trainable "
            f"tokens", f"ids {list(t.indices[:8])}"
            + ("..." if len(t.indices) > 8 else ""),
            f"values {describe_array(t.values)}", "")
           for path, t in token_deltas(delta).items()]
  return _table(rows, header=None)


def _table(rows, header) -> str:
  all_rows = ([header] if header else []) + rows
  if not all_rows:
    return ""
  widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(all_rows[0]))]
  lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
           for r in all_rows]
  if header:
    lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def summary(base: Any, delta: Any, trainable: Any = None) -> str:
  """Trainable vs total parameter counts and a per-adapter table.

  Args:
    base: the frozen parameters.
    delta: the delta tree.
    trainable: base leaves trained beside the adapters, as in
      :func:`lora_jax.optimizer` (a regex, list of regexes or callable).

  Returns:
    A first line with the counts, then :func:`describe`'s table.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
  >>> base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(0))
  >>> print(lj.summary(base, delta).splitlines()[0])
  trainable 24 / total 60 parameters (40.00%); frozen base 36, adapters 24
  """
  base_leaves = leaves_with_paths(base)
  base_params = sum(_size(x) for _, x in base_leaves)
  extra = sum(_size(x) for p, x in base_leaves if selects(trainable, p, x))
  deltas = adapters(delta)
  stacked = stacks(delta)
  tokens = token_deltas(delta)
  lora_params = sum(d.num_params for d in deltas.values()) + sum(
      _size(x) for s in stacked.values() for x in (s.a, s.b, s.magnitude)
      if x is not None) + sum(t.num_params for t in tokens.values())
  trainable_n = lora_params + extra
  total = base_params + lora_params
  pct = 100.0 * trainable_n / total if total else 0.0
  head = (f"trainable {trainable_n:,} / total {total:,} parameters "
          f"({pct:.2f}%); frozen base {base_params - extra:,}, adapters "
          f"{lora_params:,}")
  if extra:
    head += f", trained base leaves {extra:,}"
  lora_bytes = sum(_nbytes(l) for l in jax.tree.leaves(delta))
  head += f"\nadapter size {lora_bytes / 1024:,.1f} KiB in memory"
  rows = [(p, str(d.kernel_shape), str(d.rank), f"{d.scale:g}",
           f"{d.num_params:,}") for p, d in deltas.items()]
  rows += [(p, str(s.kernel_shape), f"stack of {s.size}: "
            + ",".join(map(str, s.info.ranks)),
            ",".join(f"{v:g}" for v in s.scale),
            f"{sum(_size(x) for x in (s.a, s.b, s.magnitude) if x is not None):,}")
           for p, s in stacked.items()]
  rows += [(p, str(t.kernel_shape), f"{len(t.indices)} tokens", "",
            f"{t.num_params:,}") for p, t in tokens.items()]
  table = _table(rows, header=("path", "kernel", "rank", "scale", "params"))
  return f"{head}\n{table}"
