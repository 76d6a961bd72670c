"""Shared by the sharding tests: entering a mesh on every supported JAX, and
reading collectives off compiled HLO text."""

import re

import jax
import numpy as np

AxisType = jax.sharding.AxisType
# XLA before jax 0.7.2 (jax 0.6.2, the oldest we support) partitions the
# merge engine's and the factor products less well: measured 1.6-2.8x the
# frozen model's collectives there (0.7.0 and 0.7.1 too), 1.0-1.2x from 0.7.2
# on.
OLD_XLA = tuple(int(v) for v in jax.__version__.split(".")[:3]) < (0, 7, 2)

_COLLECTIVE = re.compile(r"= ([^=]*?) (all-gather|all-reduce|reduce-scatter|"
                         r"all-to-all|collective-permute)\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def set_mesh(mesh):
  """``jax.set_mesh(mesh)`` (jax >= 0.7), else ``jax.sharding.use_mesh``."""
  setter = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
  return setter(mesh)


def reshard(x, spec):
  """``jax.sharding.reshard`` (jax >= 0.7), else the experimental one."""
  fn = getattr(jax.sharding, "reshard", None)
  if fn is None:  # jax < 0.7
    from jax.experimental.shard import reshard as fn
  return fn(x, spec)


def collectives(hlo: str) -> list:
  """``(op, dtype, shape)`` of each array a collective of ``hlo`` returns
  (every element of a tuple-shaped result, as XLA's combined all-reduces
  give)."""
  return [(op, dtype, tuple(int(d) for d in dims.split(",") if d))
          for result, op in _COLLECTIVE.findall(hlo)
          for dtype, dims in _SHAPE.findall(result)]


def collective_bytes(hlo: str) -> int:
  """Bytes the collectives of compiled ``hlo`` return, per device."""
  return sum(int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
             for _, dtype, shape in collectives(hlo))


def all_gathered_shapes(hlo: str) -> set:
  return {shape for op, _, shape in collectives(hlo) if op == "all-gather"}


_DTYPES = {"f32": "float32", "f64": "float64", "bf16": "float16",
           "f16": "float16", "s32": "int32", "u32": "uint32", "s64": "int64",
           "u64": "uint64", "s8": "int8", "u8": "uint8", "pred": "bool"}
