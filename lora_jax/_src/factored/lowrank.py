"""Low-rank products: ``x @ a`` with a backward pass that suits XLA:CPU, and
the LoRA branch of a ``dot_general`` reshaped to 2-D matmuls."""

from __future__ import annotations

import functools
import math

import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

from lora_jax._src import jaxpr_core as jc

# On XLA:CPU, x^T @ g with x (M, K) and a skinny g (M, r) runs as a GEMM
# contracting x's leading axis, 3-5x slower than the same sum written as a
# fused multiply-reduce (measured for r <= 32 on W1's shapes; see
# benchmarks/README.md). Other backends keep the GEMM.
REDUCE_MAX_RANK = 32


def _fused_reduce(r: int) -> bool:
  return r <= REDUCE_MAX_RANK and jax.default_backend() == "cpu"


@jax.custom_jvp
def project(x, a):
  """``x @ a`` for 2-D ``x (M, K)`` and ``a (K, r)``.

  Its JVP is ``dx @ a + x @ da`` with ``x @ da`` written as a broadcast
  multiply and a sum over ``K`` on CPU at small rank: reverse mode transposes
  that into ``da.T = sum_m x[m, None, :] * g[m, :, None]``, a fused
  multiply-reduce, instead of the slow ``x.T @ g`` GEMM (1.0 ms against the
  GEMM's 3-5x more for x (1024, 2048), r = 8, the same as a hand-written
  ``custom_vjp``). Forward mode (``jvp``, ``jacfwd``) works as for any JAX
  function; there the product is formed as ``(M, r, K)``. Under a mesh with
  Explicit axes the product is sharded as ``x``'s rows, the rank axis
  replicated (:func:`jaxpr_core.matmul`).
  """
  return jc.matmul(x, a)


def _tangent(x, a, dx, da):
  """The tangent of ``x @ a`` (:func:`project`'s JVP), None when both
  tangents are symbolic zeros."""
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(jc.matmul(dx, a))
  if not isinstance(da, SymbolicZero):
    if _fused_reduce(a.shape[1]):
      # (M, r, K) products summed over K; transposed: sum over M of
      # x[m, None, :] * g[m, :, None], a (r, K) reduction XLA:CPU fuses.
      terms.append(jnp.sum(x.reshape(x.shape[0], 1, x.shape[1])
                           * da.T[None, :, :], axis=2))
    else:
      terms.append(jc.matmul(x, da))
  if not terms:
    return None
  return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _project_jvp(primals, tangents):
  x, a = primals
  out = jc.matmul(x, a)
  tangent = _tangent(x, a, *tangents)
  return out, jnp.zeros_like(out) if tangent is None else tangent


project.defjvp(_project_jvp, symbolic_zeros=True)


@jax.custom_jvp
def reuse(x, a, product):
  """``x @ a`` already computed: ``product``, with :func:`project`'s
  derivatives with respect to ``x`` and ``a`` (none with respect to
  ``product``, which must be ``x @ a``). A recomputed region's backward
  pass (:mod:`recompute`) gets the low-rank product the forward pass kept
  instead of multiplying again."""
  del x, a
  return product


def _reuse_jvp(primals, tangents):
  x, a, product = primals
  tangent = _tangent(x, a, *tangents[:2])
  return product, jnp.zeros_like(product) if tangent is None else tangent


reuse.defjvp(_reuse_jvp, symbolic_zeros=True)


def a_matrix(a, in_pos, contract, r_pos, lead: int = 0):
  """Factor ``a`` as a matrix ``(*lead, K, r)``, the one place a factor is
  flattened for ``x @ a``: the kernel's contracted axes ``contract`` (found
  at ``in_pos[k]`` in ``a``) flattened into ``K`` in that order, the rank
  axis ``r_pos`` last, and the first ``lead`` axes (a per-row factor's row
  axis) kept in front."""
  return as_matrix(a, tuple([in_pos[k] for k in contract] + [r_pos]), lead)


def as_matrix(f, perm: tuple, lead: int = 0):
  """``f`` with its axes after the first ``lead`` put in the order ``perm``
  (positions among those axes) and all but the last flattened: ``(*lead,
  K, last)``."""
  f = jnp.transpose(f, list(range(lead)) + [lead + p for p in perm])
  return jc.reshape(f, (*f.shape[:lead], math.prod(f.shape[lead:-1]),
                        f.shape[-1]))


@functools.partial(jax.jit, inline=True, static_argnames=(
    "f_perm", "s_perm", "n_x", "kernel_is_lhs", "fold"))
def _low_2d(x, first, second, scale, projected, *, f_perm, s_perm, n_x,
            kernel_is_lhs, fold):
  """The 2-D fast path of :func:`lowrank_dot`, jitted so that its trace and
  its linearization are made once per shape, not once per kernel. ``fold``:
  ``scale`` multiplies the factor (in ``scale``'s dtype, the wider of the
  factor's and ``x``'s), else ``x @ a`` (in ``x``'s)."""
  dtype = x.dtype
  f1 = as_matrix(first, f_perm)
  k_size = f1.shape[0]
  f2 = jnp.transpose(second, s_perm)
  n_shape = f2.shape[1:]
  f2 = jc.reshape(f2, (f2.shape[0], math.prod(n_shape)))
  m_shape = x.shape[:n_x]
  if projected is None:
    x2 = jc.reshape(x, (math.prod(m_shape), k_size))
    if fold:  # the scale folded into the factor (r x K multiplies, not M x r)
      t = project(x2, (f1.astype(scale.dtype) * scale).astype(dtype))
    else:
      t = project(x2, f1.astype(dtype)) * scale
  else:
    t = projected.astype(dtype)
  u = jc.reshape(jc.matmul(t, f2.astype(dtype)), (*m_shape, *n_shape))
  if kernel_is_lhs:
    u = jnp.moveaxis(u, list(range(len(m_shape))),
                     list(range(len(n_shape), len(n_shape) + len(m_shape))))
  return u


def lowrank_dot(x, lora, x_contract, k_contract, x_batch, k_batch,
                kernel_is_lhs: bool, projected=None):
  """``dot_general(x, scale * a @ b)`` (or with the kernel on the left) in
  low rank, in ``x``'s dtype (the caller casts ``x`` to the compute dtype).

  Returns ``(result, rule)``, or ``(None, None)`` when the contraction does
  not line up with the layout. ``projected``: ``scale * x @ a`` already
  computed (for kernels sharing an input).
  """
  lay = lora.layout
  sets = frozenset
  free = sets(range(lora.w.ndim)) - sets(k_contract) - sets(k_batch)
  if sets(lay.batch) != sets(k_batch):
    return None, None
  in_a, in_b, r_a, r_b = lay.factor_positions()
  if sets(lay.inputs) == sets(k_contract) and sets(lay.outputs) == free:
    first, f_pos, f_r, second, s_pos, s_r = lora.a, in_a, r_a, lora.b, in_b, r_b
    rule = "dot_general"
  elif sets(lay.outputs) == sets(k_contract) and sets(lay.inputs) == free:
    first, f_pos, f_r, second, s_pos, s_r = lora.b, in_b, r_b, lora.a, in_a, r_a
    rule = "dot_general (transposed use)"
  else:
    return None, None
  dtype = x.dtype
  scale = jnp.asarray(lora.scale, dtype)
  free_sorted = sorted(free)  # dot_general emits kernel free dims ascending
  nbatch = len(k_batch)
  x_free = [d for d in range(x.ndim) if d not in x_contract and d not in x_batch]
  if not k_batch and tuple(x_contract) == tuple(
      range(x.ndim - len(x_contract), x.ndim)):
    # 2-D fast path: (M, K) @ (K, r) @ (r, N), no transposes of activations.
    f_perm = tuple([f_pos[k] for k in k_contract] + [f_r])
    s_perm = tuple([s_r] + [s_pos[k] for k in free_sorted])
    # A Python scale folds into the factor, in the wider of its dtype and
    # x's (never rounded to a narrower factor's); a scale that is data (a
    # stack's row under vmap, per rank for the one-hot form) multiplies the
    # product, so that factors shared by the rows stay shared.
    fold = isinstance(lora.scale, (int, float))
    u = _low_2d(x, first, second,
                None if projected is not None else jnp.asarray(
                    lora.scale, jnp.promote_types(first.dtype, dtype)
                    if fold else dtype),
                projected, f_perm=f_perm, s_perm=s_perm,
                n_x=x.ndim - len(x_contract), kernel_is_lhs=kernel_is_lhs,
                fold=fold)
    return u, rule
  # General case: batched dot_generals.
  t = jc.dot(
      x, first.astype(dtype),
      ((tuple(x_contract), tuple(f_pos[k] for k in k_contract)),
       (tuple(x_batch), tuple(f_pos[k] for k in k_batch))))
  t = t * scale  # (batch, x_free, r)
  u = jc.dot(
      t, second.astype(dtype),
      (((t.ndim - 1,), (s_r,)),
       (tuple(range(nbatch)), tuple(s_pos[k] for k in k_batch))))
  # u: (batch, x_free, second's free axes in factor order) -> ascending view
  second_free = [k for k in sorted(s_pos, key=s_pos.get) if k in free]
  order = [second_free.index(k) for k in free_sorted]
  base_nd = nbatch + len(x_free)
  perm = list(range(base_nd)) + [base_nd + i for i in order]
  u = jnp.transpose(u, perm)
  if kernel_is_lhs:
    nk = len(free_sorted)
    perm = (list(range(nbatch)) + list(range(base_nd, base_nd + nk))
            + list(range(nbatch, base_nd)))
    u = jnp.transpose(u, perm)
  return u, rule
