"""Shardings of the LoRA factors, derived from the base kernels' shardings.

A kernel sharded ``P(s_0, ..., s_n)`` gives ``a`` the kernel's specs on its
batch and input axes with the rank axis replicated, and ``b`` the kernel's
specs on its batch and output axes with the rank axis replicated (DoRA's
magnitude: batch and output axes). So ``x @ a`` contracts exactly like
``x @ W0`` does, ``b`` splits the output like ``W0``, and the small rank axis
is never split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from lora_jax._src import jaxpr_core as jc
from lora_jax._src.delta import LoraDelta
from lora_jax._src.delta import adapters
from lora_jax._src.delta import is_concrete
from lora_jax._src.delta import is_delta_or_none
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.paths import map_with_paths


def _padded(spec: PartitionSpec | None, ndim: int) -> tuple:
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the kernel "
                     f"has axes ({ndim}).")
  return entries + (None,) * (ndim - len(entries))


def factor_specs(spec: PartitionSpec | None, layout: Layout):
  """``(a_spec, b_spec, magnitude_spec)`` for a kernel sharded by ``spec``.

  ``a`` takes the kernel's specs on its batch and input axes, ``b`` on its
  batch and output axes, DoRA's magnitude on its batch and output axes; the
  rank axis is replicated (see the docs page "Sharding").

  Args:
    spec: the kernel's ``PartitionSpec`` (None: replicated).
    layout: the kernel's :class:`lora_jax.Layout`.

  Returns:
    Three ``PartitionSpec`` objects.

  >>> from jax.sharding import PartitionSpec as P
  >>> import lora_jax as lj
  >>> [tuple(s) for s in lj.factor_specs(P("data", "model"), lj.Layout.dense())]
  [('data', None), (None, 'model'), ('model',)]
  """
  s = _padded(spec, layout.ndim)
  in_a, in_b, _, _ = layout.factor_positions()
  per_output = {k: layout.magnitude_axis(k) for k in layout.batch + layout.outputs}

  def place(positions: dict, ndim: int) -> PartitionSpec:
    entries = [None] * ndim  # the rank axis stays replicated
    for k, i in positions.items():
      entries[i] = s[k]
    return PartitionSpec(*entries)
  return (place(in_a, len(in_a) + 1), place(in_b, len(in_b) + 1),
          place(per_output, len(per_output)))


def unpack_sharding(kernel_sharding: Any, who: str
                    ) -> tuple[PartitionSpec | None, Callable[[PartitionSpec],
                                                         Any], Any]:
  """``(spec, wrap, mesh)`` of a kernel's sharding: a ``NamedSharding``'s
  spec, ``wrap`` putting a spec on its mesh, and the mesh; a
  ``PartitionSpec`` (or None) itself, the identity and no mesh.

  Raises:
    TypeError: naming ``who``, for anything else.
  """
  if isinstance(kernel_sharding, NamedSharding):
    mesh = kernel_sharding.mesh
    return kernel_sharding.spec, lambda p: NamedSharding(mesh, p), mesh
  if isinstance(kernel_sharding, PartitionSpec) or kernel_sharding is None:
    return kernel_sharding, lambda p: p, None
  raise TypeError(
      f"{who} expects a NamedSharding or a PartitionSpec for the kernel, got "
      f"{kernel_sharding!r}. (A single-device or replicated kernel needs no "
      f"derived sharding.)")


def factor_shardings(kernel_sharding: Any, d: LoraDelta) -> LoraDelta:
  """A LoraDelta whose children are the shardings of ``d``'s children."""
  spec, wrap, _ = unpack_sharding(kernel_sharding, "delta_shardings")
  a, b, m = factor_specs(spec, d.layout)
  return d.replace(a=wrap(a), b=wrap(b),
                   magnitude=None if d.magnitude is None else wrap(m))


def delta_shardings(delta: Any, base_shardings: Any) -> Any:
  """Shardings for ``delta``, derived from the base kernels' shardings.

  ``base_shardings`` is a tree like the base whose leaves are
  ``NamedSharding``s or ``PartitionSpec``s (e.g. ``jax.tree.map(lambda x:
  x.sharding, base)``, or the specs a model declares). ``delta`` may be
  abstract (``jax.eval_shape`` of :func:`lora_jax.split`): only its layouts
  are read. The result has ``delta``'s structure with a :class:`LoraDelta` of
  shardings at each adapter, ready for ``jax.jit(..., out_shardings=...)``,
  ``jax.device_put`` or :func:`lora_jax.load`.

  Args:
    delta: a delta tree, concrete or abstract.
    base_shardings: a tree like the base with a ``NamedSharding`` or
      ``PartitionSpec`` (or None) at each adapted kernel's path.

  Returns:
    ``delta``'s structure with a ``LoraDelta`` of shardings at each adapter.

  Raises:
    ValueError: an adapter whose kernel has no entry in ``base_shardings``.
    TypeError: an entry that is neither a ``NamedSharding`` nor a
      ``PartitionSpec``.

  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> from jax.sharding import PartitionSpec as P
  >>> _, delta = lj.split({"w": jnp.ones((8, 4))}, lj.LoraConfig(rank=2,
  ...                     targets="w"), jax.random.key(0))
  >>> tuple(lj.delta_shardings(delta, {"w": P(None, "model")})["w"].b)
  (None, 'model')
  """
  specs = dict(leaves_with_paths(
      base_shardings, is_leaf=lambda x: isinstance(x, (PartitionSpec,
                                                       jax.sharding.Sharding))
      or x is None))
  deltas = adapters(delta)
  missing = [p for p in deltas if p not in specs]
  if missing:
    raise ValueError(f"delta_shardings: no base sharding for {missing[:3]}.")
  return map_with_paths(
      lambda p, d: factor_shardings(specs[p], d) if isinstance(
          d, LoraDelta) else d, delta, is_leaf=is_delta_or_none)


def follow_kernel(a: Any, b: Any, magnitude: Any, layout: Layout,
                  kernel: Any, constraint: Any = None) -> tuple:
  """``(a, b, magnitude)`` placed to follow a kernel the program has just
  resharded (an FSDP gather, say), so ``x @ a`` contracts as ``x @ W0``
  does: under Explicit mesh axes resharded to ``kernel``'s sharding type,
  else constrained as ``constraint`` (the ``NamedSharding`` of the program's
  ``with_sharding_constraint``) puts the kernel (:func:`factor_specs`).
  Unchanged without either."""
  spec = jc.type_spec(kernel)
  mesh = _typed_mesh(kernel)
  if spec is not None:
    sa, sb, sm = factor_specs(PartitionSpec(*spec), layout)
    move = lambda v, s: v if v is None else jc.reshard_to(v, tuple(s))
  elif mesh is not None and jc.type_spec(a) is not None:
    # the kernel left Explicit axes for a mesh whose axes are Auto (an
    # auto_axes region, as .at[ids].get(out_sharding=...) makes for a
    # lookup): its factors go with it, placed by the compiler there
    sa, sb, sm = factor_specs(None, layout)
    move = lambda v, s: v if v is None else _reshard(v, NamedSharding(mesh, s))
  elif isinstance(constraint, NamedSharding):
    sa, sb, sm = factor_specs(constraint.spec, layout)
    mesh = constraint.mesh
    move = lambda v, s: v if v is None else jc.constrain(
        v, NamedSharding(mesh, s))
  else:
    return a, b, magnitude
  return move(a, sa), move(b, sb), move(magnitude, sm)


def follow_kernel_mesh(v: Any, kernel: Any) -> Any:
  """``v`` (a traced scale: a stack's adapter picked by a traced index)
  moved onto ``kernel``'s mesh where the kernel has left Explicit axes for
  an Auto region (:func:`follow_kernel`), replicated there; else ``v``."""
  mesh = _typed_mesh(kernel)
  if mesh is None or not hasattr(v, "shape") or jc.type_spec(v) is None:
    return v
  return _reshard(v, NamedSharding(mesh, PartitionSpec(*(None,) * v.ndim)))


def onto_mesh_of(v: Any, like: Any, spec: tuple) -> Any:
  """``v`` resharded to ``spec`` on the mesh ``like``'s type names (a value
  with no mesh in its type, such as ids given as a plain array, put beside
  values on an Explicit-axis mesh)."""
  if jc.type_spec(v) == tuple(spec):
    return v
  mesh = jax.typeof(like).sharding.mesh
  return _reshard(v, NamedSharding(mesh, PartitionSpec(*spec)))


def _typed_mesh(x: Any) -> Any:
  """The mesh ``x``'s type names when every axis of it is Auto (a value
  inside an ``auto_axes`` region under Explicit axes); else None."""
  typeof = getattr(jax, "typeof", None)
  mesh = getattr(getattr(typeof(x) if typeof is not None else None,
                         "sharding", None), "mesh", None)
  types = getattr(mesh, "axis_types", None)
  auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
  if not types or auto is None or any(t != auto for t in types):
    return None
  return mesh


def _reshard(x: Any, sharding: NamedSharding) -> Any:
  if hasattr(jax.sharding, "reshard"):
    return jax.sharding.reshard(x, sharding)
  from jax.experimental.shard import reshard  # jax < 0.7
  return reshard(x, sharding)


def place_like_kernel(kernel: Any, d: LoraDelta) -> LoraDelta:
  """Puts ``d``'s factors on shardings derived from a concrete, sharded
  ``kernel``; leaves ``d`` as it is otherwise (tracers, single device)."""
  sharding = kernel.sharding if is_concrete(kernel) else None
  if not isinstance(sharding, NamedSharding) or not is_concrete(d.a):
    return d
  target = factor_shardings(sharding, d)
  return d.replace(
      a=jax.device_put(d.a, target.a), b=jax.device_put(d.b, target.b),
      magnitude=None if d.magnitude is None else jax.device_put(
          d.magnitude, target.magnitude))
