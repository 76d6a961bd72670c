"""The factored engine: LoRA without materialising ``scale * a @ b``.

``factored_apply`` traces the apply function to a jaxpr and evaluates it with
every adapted kernel carried symbolically as a :class:`Lora` value (the base
kernel, both factors, the scale and a layout relative to the value's axes).
Ops that only re-view a kernel (``transpose``, ``convert_element_type``)
keep it symbolic; ops that consume it have a rule that computes
``op(x, W0) + scale * op'(op''(x, a), b)`` in low rank: ``dot_general`` (either
side, any contracting and batch dims, the transposed use of a tied embedding
included), ``conv_general_dilated`` and row ``gather``. Sub-programs are
re-emitted through public API with this interpreter inside: ``jit`` is inlined,
``scan`` becomes ``jax.lax.scan`` (stacked kernels sliced per step), ``remat``
becomes ``jax.checkpoint`` (same policy), ``cond`` ``jax.lax.switch`` and
``while`` ``jax.lax.while_loop``. Any other consumer gets the kernel merged
(``W0 + scale * a @ b``) for that use only; that fallback is counted, warned
about once, and an error under ``strict=True``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from lora_jax._src.delta import LoraDelta, adapted_weight, dora_norm
from lora_jax._src.layouts import Layout
from lora_jax._src.paths import leaves_with_paths
from lora_jax._src.tracing import bind_eqn, trace


class FallbackError(RuntimeError):
  """Raised under ``strict=True`` when a kernel would have to be merged."""


@dataclasses.dataclass(frozen=True)
class Lora:
  """A kernel value ``w + scale * a @ b`` kept in factored form.

  ``layout`` refers to the axes of ``w`` (a view of the stored kernel); ``a``
  and ``b`` keep their stored axis order, which the layout's tuples follow.
  """
  w: Any
  a: Any
  b: Any
  scale: float
  layout: Layout
  path: str
  magnitude: Any = None
  dropout: float = 0.0

  def flat(self):
    return [self.w, self.a, self.b, self.magnitude]

  def rebuild(self, w, a, b, magnitude=None) -> "Lora":
    return dataclasses.replace(self, w=w, a=a, b=b, magnitude=magnitude)

  @property
  def delta(self) -> LoraDelta:
    return LoraDelta(self.a, self.b, self.scale, self.layout, self.magnitude,
                     self.dropout)

  def materialize(self) -> jax.Array:
    return adapted_weight(self.w, self.delta)

  def dora_factor(self, dtype) -> jax.Array:
    """``magnitude / ||W0 + s a b||`` per output unit, norm held constant."""
    norm = jax.lax.stop_gradient(dora_norm(self.w, self.delta, dtype))
    return self.magnitude.astype(dtype) / norm


@dataclasses.dataclass
class Report:
  """What the engine did with each adapted kernel: ``{path: [rule, ...]}``."""
  rules: dict = dataclasses.field(default_factory=dict)
  fallbacks: dict = dataclasses.field(default_factory=dict)

  def record(self, path: str, rule: str):
    self.rules.setdefault(path, [])
    if rule not in self.rules[path]:
      self.rules[path].append(rule)

  def __str__(self) -> str:
    width = max((len(p) for p in self.rules), default=0)
    lines = [f"{p.ljust(width)}  {', '.join(r)}" for p, r in self.rules.items()]
    n = sum(self.fallbacks.values())
    lines.append(f"{n} merge fallback(s)" + (
        ": " + ", ".join(f"{p} ({prim})" for (p, prim) in self.fallbacks)
        if n else ""))
    return "\n".join(lines)


class _Context:
  """Per-call settings and bookkeeping of the interpreter."""

  def __init__(self, strict: bool, report: Report, choose: Callable | None,
               rng: jax.Array | None = None):
    self.strict = strict
    self.report = report
    self.choose = choose  # (kind, cost numbers) -> "factored" | "merge"
    self.rng = rng        # dropout key; None: no dropout (inference)
    self.uses = 0
    # id(eqn) -> scale * x @ a, computed jointly for kernels sharing an input
    self.projected: dict[int, Any] = {}

  def next_key(self) -> jax.Array:
    self.uses += 1
    return jax.random.fold_in(self.rng, self.uses)

  def dropout(self, x: jax.Array, lora: Lora) -> jax.Array:
    """Inverted dropout on the LoRA branch's input (as PEFT), if enabled."""
    if self.rng is None or not lora.dropout:
      return x
    keep = 1.0 - lora.dropout
    mask = jax.random.bernoulli(self.next_key(), keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))

  def fallback(self, lora: Lora, primitive: str) -> jax.Array:
    key = (lora.path, primitive)
    if self.strict:
      raise FallbackError(
          f"lora_jax.wrap(mode='factored', strict=True): no factored rule for "
          f"{primitive!r} consuming {lora.path!r}. Use strict=False to merge "
          f"this kernel for that use (counted and warned about), or "
          f"mode='merge'.")
    if key not in self.report.fallbacks:
      warnings.warn(
          f"lora_jax factored engine: {primitive!r} consumes {lora.path!r} and "
          f"has no factored rule; merging that kernel for this use.",
          stacklevel=3)
    self.report.fallbacks[key] = self.report.fallbacks.get(key, 0) + 1
    self.report.record(lora.path, f"merge-fallback ({primitive})")
    return lora.materialize()


def _read(env, v):
  return v.val if isinstance(v, jex.Literal) else env[v]


def _concrete(x, ctx, what):
  return ctx.fallback(x, what) if isinstance(x, Lora) else x


def eval_jaxpr(jaxpr: jex.Jaxpr, consts, args, ctx: _Context) -> list:
  """Evaluates ``jaxpr`` where some inputs may be :class:`Lora` values."""
  env: dict = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [_read(env, v) for v in eqn.invars]
    if any(isinstance(x, Lora) for x in invals):
      if eqn.primitive.name == "dot_general" and id(eqn) not in ctx.projected:
        _project_siblings(jaxpr.eqns, i, env, ctx)
      rule = _RULES.get(eqn.primitive.name, _fallback_rule)
      outs = rule(eqn, invals, ctx)
    else:
      outs = bind_eqn(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [_concrete(_read(env, v), ctx, "output") for v in jaxpr.outvars]


def _plain_projection(eqn, env, ctx):
  """``(x var, contraction, lora)`` if ``eqn`` is ``x @ kernel`` taking the 2-D
  fast path of :func:`_lowrank_dot` with a plain (no DoRA, no dropout)
  adapter, which the engine (auto) would factor; else None."""
  if eqn.primitive.name != "dot_general":
    return None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = eqn.invars
  if lb or rb or isinstance(lhs, jex.Literal) or isinstance(rhs, jex.Literal):
    return None
  lora, x = env.get(rhs), env.get(lhs)
  if not isinstance(lora, Lora) or x is None or isinstance(x, Lora):
    return None
  nd = len(lhs.aval.shape)
  lay = lora.layout
  if (lora.magnitude is not None or (ctx.rng is not None and lora.dropout)
      or lay.batch or set(lay.inputs) != set(rc)
      or tuple(lc) != tuple(range(nd - len(lc), nd))):
    return None
  if ctx.choose is not None and ctx.choose("dot_general", x.shape, lc,
                                           lora) == "merge":
    return None
  return lhs, tuple(lc), lora


def _project_siblings(eqns, i, env, ctx):
  """Kernels that read the same input (q, k, v; gate and up) get their
  ``x @ a`` in one matmul against the concatenated ``a``s: one pass over
  ``x`` forward and one for the gradients, instead of one per kernel."""
  head = _plain_projection(eqns[i], env, ctx)
  if head is None:
    return
  group = [(eqns[i], head[2])]
  for eqn in eqns[i + 1:]:
    other = _plain_projection(eqn, env, ctx)
    if other is not None and other[:2] == head[:2]:
      group.append((eqn, other[2]))
  if len(group) < 2:
    return
  x = env[head[0]]
  dtype = jnp.result_type(x.dtype, *(l.a.dtype for _, l in group))
  firsts = []
  for eqn, lora in group:
    in_a, _, r_a, _ = _factor_positions(lora.layout)
    k_contract = eqn.params["dimension_numbers"][0][1]
    f1 = jnp.transpose(lora.a, [in_a[k] for k in k_contract] + [r_a])
    firsts.append(f1.reshape(-1, f1.shape[-1]).astype(dtype))
  k_size = firsts[0].shape[0]
  x2 = x.astype(dtype).reshape(-1, k_size)
  t = _project(x2, jnp.concatenate(firsts, axis=1))
  offsets = list(itertools.accumulate(f.shape[1] for f in firsts))[:-1]
  for (eqn, lora), part in zip(group, jnp.split(t, offsets, axis=1)):
    ctx.projected[id(eqn)] = part * jnp.asarray(lora.scale, dtype)


def _fallback_rule(eqn, invals, ctx, dropping: bool = False):
  if dropping:
    lora = next(x for x in invals if isinstance(x, Lora))
    raise FallbackError(
        f"lora_jax: {lora.path!r} has LoRA dropout and is consumed by "
        f"{eqn.primitive.name!r} in a way the factored engine cannot express; "
        f"merging cannot apply input dropout. Set dropout=0 for this leaf or "
        f"call without lora_rng.")
  invals = [_concrete(x, ctx, eqn.primitive.name) for x in invals]
  return bind_eqn(eqn, invals)


# ---- views -----------------------------------------------------------------

def _transpose(eqn, invals, ctx):
  (x,) = invals
  perm = eqn.params["permutation"]
  pos = {old: new for new, old in enumerate(perm)}
  lay = x.layout
  layout = Layout(tuple(pos[k] for k in lay.batch),
                  tuple(pos[k] for k in lay.inputs),
                  tuple(pos[k] for k in lay.outputs))
  return [dataclasses.replace(x, w=jnp.transpose(x.w, perm), layout=layout)]


def _convert(eqn, invals, ctx):
  (x,) = invals
  return [x.rebuild(bind_eqn(eqn, [x.w])[0], x.a, x.b)]


def _identity(eqn, invals, ctx):
  return list(invals)


# ---- consumers ---------------------------------------------------------------

def _factor_positions(lay: Layout):
  """Axis of each view axis in ``a`` and in ``b``, and the rank axis of each."""
  nb = len(lay.batch)
  in_a = {k: i for i, k in enumerate(lay.batch + lay.inputs)}
  in_b = {k: i for i, k in enumerate(lay.batch)}
  in_b.update({k: nb + 1 + i for i, k in enumerate(lay.outputs)})
  return in_a, in_b, len(lay.batch) + len(lay.inputs), nb


# On XLA:CPU, x^T @ g with x (M, K) and a skinny g (M, r) runs as a GEMM
# contracting x's leading axis, 3-5x slower than the same sum written as a
# fused multiply-reduce (measured for r <= 32 on W1's shapes; see
# benchmarks/README.md). Other backends keep the GEMM.
REDUCE_MAX_RANK = 32


def _xt_dot(x, g):
  """``x.T @ g`` for ``x (M, K)`` and ``g (M, r)``."""
  if g.shape[1] <= REDUCE_MAX_RANK and jax.default_backend() == "cpu":
    return jnp.sum(x[:, None, :] * g[:, :, None], axis=0).T
  return x.T @ g


@jax.custom_vjp
def _project(x, a):
  """``x @ a`` for 2-D ``x (M, K)`` and ``a (K, r)``; its VJP computes
  ``dx = g @ a.T`` and ``da = x.T @ g`` by :func:`_xt_dot`."""
  return x @ a


def _project_fwd(x, a):
  return x @ a, (x, a)


def _project_bwd(res, g):
  x, a = res
  return g @ a.T, _xt_dot(x, g)


_project.defvjp(_project_fwd, _project_bwd)


def _lowrank_dot(x, lora: Lora, x_contract, k_contract, x_batch, k_batch,
                 kernel_is_lhs: bool, projected=None):
  """``dot_general(x, scale * a @ b)`` (or with the kernel on the left) in low
  rank, in the factors' precision; None when the contraction does not line up
  with the layout. ``projected``: ``scale * x @ a`` already computed."""
  lay = lora.layout
  sets = lambda t: frozenset(t)
  free = sets(range(lora.w.ndim)) - sets(k_contract) - sets(k_batch)
  if sets(lay.batch) != sets(k_batch):
    return None, None
  in_a, in_b, r_a, r_b = _factor_positions(lay)
  if sets(lay.inputs) == sets(k_contract) and sets(lay.outputs) == free:
    first, f_pos, f_r, second, s_pos, s_r = lora.a, in_a, r_a, lora.b, in_b, r_b
    rule = "dot_general"
  elif sets(lay.outputs) == sets(k_contract) and sets(lay.inputs) == free:
    first, f_pos, f_r, second, s_pos, s_r = lora.b, in_b, r_b, lora.a, in_a, r_a
    rule = "dot_general (transposed use)"
  else:
    return None, None
  dtype = jnp.result_type(x.dtype, first.dtype)
  x = x.astype(dtype)
  free_sorted = sorted(free)  # dot_general emits kernel free dims ascending
  nbatch = len(k_batch)
  x_free = [d for d in range(x.ndim) if d not in x_contract and d not in x_batch]
  if not k_batch and tuple(x_contract) == tuple(range(x.ndim - len(x_contract), x.ndim)):
    # 2-D fast path: (M, K) @ (K, r) @ (r, N), no transposes of activations.
    f1 = jnp.transpose(first, [f_pos[k] for k in k_contract] + [f_r])
    k_size = math.prod(f1.shape[:-1])
    f1 = f1.reshape(k_size, f1.shape[-1])
    f2 = jnp.transpose(second, [s_r] + [s_pos[k] for k in free_sorted])
    n_shape = f2.shape[1:]
    f2 = f2.reshape(f2.shape[0], math.prod(n_shape))
    m_shape = x.shape[:x.ndim - len(x_contract)]
    x2 = x.reshape(math.prod(m_shape), k_size)
    if projected is None:
      t = _project(x2, f1.astype(dtype)) * jnp.asarray(lora.scale, dtype)
    else:
      t = projected.astype(dtype)
    u = t @ f2.astype(dtype)
    u = u.reshape(*m_shape, *n_shape)
    if kernel_is_lhs:
      u = jnp.moveaxis(u, list(range(len(m_shape))),
                       list(range(len(n_shape), len(n_shape) + len(m_shape))))
    return u, rule
  # General case: batched dot_generals.
  t = jax.lax.dot_general(
      x, first.astype(dtype),
      ((tuple(x_contract), tuple(f_pos[k] for k in k_contract)),
       (tuple(x_batch), tuple(f_pos[k] for k in k_batch))))
  t = t * jnp.asarray(lora.scale, dtype)  # (batch, x_free, r)
  u = jax.lax.dot_general(
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


def _dot_general(eqn, invals, ctx):
  lhs, rhs = invals
  if isinstance(lhs, Lora) and isinstance(rhs, Lora):
    return _fallback_rule(eqn, invals, ctx)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if isinstance(rhs, Lora):
    lora, x, args = rhs, lhs, (lc, rc, lb, rb, False)
  else:
    lora, x, args = lhs, rhs, (rc, lc, rb, lb, True)
  out_dtype = eqn.outvars[0].aval.dtype
  dropping = ctx.rng is not None and lora.dropout > 0
  if not dropping and ctx.choose is not None and ctx.choose(
      "dot_general", x.shape, args[0], lora) == "merge":
    ctx.report.record(lora.path, "merge (auto: cheaper)")
    return bind_eqn(eqn, [lora.materialize() if v is lora else v
                          for v in invals])
  x_lora = ctx.dropout(x, lora)
  low, rule = _lowrank_dot(x_lora, lora, *args,
                           projected=ctx.projected.pop(id(eqn), None))
  if low is None or (lora.magnitude is not None and rule != "dot_general"):
    return _fallback_rule(eqn, invals, ctx, dropping)
  base = bind_eqn(eqn, [lora.w if v is lora else v for v in invals])[0]
  ctx.report.record(lora.path, rule + (" + DoRA" if lora.magnitude is not None
                                       else ""))
  if lora.magnitude is None:
    return [base + low.astype(out_dtype)]
  # DoRA: (m / ||W0 + s a b||) * (x W0 + s (x a) b), per output unit.
  k_batch, kernel_is_lhs = args[3], args[4]
  factor = _output_factor(lora.dora_factor(low.dtype), lora.layout, k_batch,
                          x.ndim - len(args[0]) - len(args[2]), kernel_is_lhs)
  return [(factor * (base.astype(low.dtype) + low)).astype(out_dtype)]


def _output_factor(values, lay: Layout, k_batch, n_x_free: int,
                   kernel_is_lhs: bool):
  """``(*batch, *out)`` values placed to broadcast against a dot's output:
  batch dims first (in the dot's order), then x's free dims and the kernel's
  free dims (ascending) in the order the dot emits them."""
  axes = lay.batch + lay.outputs
  outs_sorted = sorted(lay.outputs)
  want = list(k_batch) + outs_sorted
  v = jnp.transpose(values, [axes.index(k) for k in want])
  nb = len(k_batch)
  ones = (1,) * n_x_free
  shape = (v.shape[:nb] + ((v.shape[nb:] + ones) if kernel_is_lhs
                           else (ones + v.shape[nb:])))
  return v.reshape(shape)


def _conv(eqn, invals, ctx):
  lhs, rhs = invals
  p = eqn.params
  if (isinstance(lhs, Lora) or p["feature_group_count"] != 1
      or p["batch_group_count"] != 1):
    return _fallback_rule(eqn, invals, ctx)
  lora = rhs
  lay = lora.layout
  rhs_spec = p["dimension_numbers"].rhs_spec
  out_axis = rhs_spec[0]
  if lay.batch or lay.outputs != (out_axis,) or set(lay.inputs) != set(rhs_spec[1:]):
    return _fallback_rule(eqn, invals, ctx)
  base = bind_eqn(eqn, [lhs, lora.w])[0]
  # a as a conv kernel with r output features, in the view's axis order
  r = lora.a.shape[-1]
  order = list(lay.inputs) + [out_axis]
  perm = sorted(range(len(order)), key=lambda i: order[i])
  a_kernel = jnp.transpose(lora.a, perm)
  dtype = jnp.result_type(lhs.dtype, lora.a.dtype)
  hidden = jax.lax.conv_general_dilated(
      ctx.dropout(lhs, lora).astype(dtype), a_kernel.astype(dtype), p["window_strides"],
      p["padding"], p["lhs_dilation"], p["rhs_dilation"],
      p["dimension_numbers"], precision=p["precision"])
  feat = p["dimension_numbers"].out_spec[1]
  hidden = jnp.moveaxis(hidden, feat, -1) * jnp.asarray(lora.scale, dtype)
  shape = hidden.shape
  low = (hidden.reshape(-1, r) @ lora.b.astype(dtype)).reshape(
      *shape[:-1], lora.b.shape[-1])
  low = jnp.moveaxis(low, -1, feat)
  if lora.magnitude is not None:
    shape = [1] * low.ndim
    shape[feat] = low.shape[feat]
    factor = lora.dora_factor(dtype).reshape(shape)
    ctx.report.record(lora.path, "conv_general_dilated + DoRA")
    return [(factor * (base.astype(dtype) + low)).astype(base.dtype)]
  ctx.report.record(lora.path, "conv_general_dilated")
  return [base + low.astype(base.dtype)]


def _gather(eqn, invals, ctx):
  operand, indices = invals
  lora = operand
  if isinstance(indices, Lora) or lora.magnitude is not None:
    return _fallback_rule(eqn, invals, ctx)
  lay = lora.layout
  dn = eqn.params["dimension_numbers"]
  sizes = eqn.params["slice_sizes"]
  ok = (lora.w.ndim == 2 and not lay.batch and dn.collapsed_slice_dims == lay.inputs
        and tuple(dn.start_index_map) == lay.inputs and len(dn.offset_dims) == 1
        and sizes[lay.outputs[0]] == lora.w.shape[lay.outputs[0]]
        and not dn.operand_batching_dims)
  if not ok:
    return _fallback_rule(eqn, invals, ctx)
  base = bind_eqn(eqn, [lora.w, indices])[0]
  # Gather rows of a (vocab, r) with the same indices, then project with b.
  params = dict(eqn.params)
  a_sizes = list(sizes)
  a_sizes[lay.outputs[0]] = lora.a.shape[-1]
  params["slice_sizes"] = tuple(a_sizes)
  rows = eqn.primitive.bind(lora.a, indices, **params)
  off = dn.offset_dims[0]
  rows = jnp.moveaxis(rows, off, -1) * jnp.asarray(lora.scale, rows.dtype)
  low = jnp.moveaxis(rows @ lora.b, -1, off).astype(base.dtype)
  ctx.report.record(lora.path, "gather")
  return [base + low]


# ---- sub-programs ------------------------------------------------------------

def _flatten(vals):
  """Splits values into flat arrays plus a function that rebuilds them."""
  flat, spec = [], []
  for x in vals:
    if isinstance(x, Lora):
      spec.append((len(flat), x))
      flat.extend(x.flat())
    else:
      spec.append((len(flat), None))
      flat.append(x)

  def rebuild(flat_vals):
    out = []
    for start, lora in spec:
      out.append(flat_vals[start] if lora is None
                 else lora.rebuild(*flat_vals[start:start + 4]))
    return out
  return flat, rebuild


def _inline(eqn, invals, ctx):
  closed = eqn.params["jaxpr"]
  return eval_jaxpr(closed.jaxpr, closed.consts, invals, ctx)


def _remat(eqn, invals, ctx):
  p = eqn.params
  flat, rebuild = _flatten(invals)
  jaxpr = p["jaxpr"]

  def body(*flat_vals):
    return eval_jaxpr(jaxpr, [], rebuild(list(flat_vals)), ctx)
  return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"],
                             policy=p["policy"])(*flat))


def _drop_leading(lora: Lora) -> Lora:
  """The per-step slice of a kernel stacked along view axis 0."""
  lay = lora.layout
  if 0 not in lay.batch:
    raise ValueError
  i = lay.batch.index(0)
  a = jnp.moveaxis(lora.a, i, 0)
  b = jnp.moveaxis(lora.b, i, 0)
  m = None if lora.magnitude is None else jnp.moveaxis(lora.magnitude, i, 0)
  rest = lay.batch[:i] + lay.batch[i + 1:]
  dec = lambda axes: tuple(k - 1 for k in axes)
  return dataclasses.replace(
      lora, a=a, b=b, magnitude=m,
      layout=Layout(dec(rest), dec(lay.inputs), dec(lay.outputs)))


def _scan(eqn, invals, ctx):
  p = eqn.params
  nc, ncarry = p["num_consts"], p["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  init = [_concrete(x, ctx, "scan carry") for x in init]
  moved = []
  for x in xs:
    if isinstance(x, Lora):
      try:
        moved.append(_drop_leading(x))
      except ValueError:
        moved.append(_concrete(x, ctx, "scan over a non-batch axis"))
    else:
      moved.append(x)
  # a and b of a stacked kernel are scanned along their (moved) leading axis.
  xs_flat, rebuild = _flatten(moved)
  closed = p["jaxpr"]
  # Dropout draws a fresh key per scan step.
  keys = (None if ctx.rng is None
          else jax.random.split(ctx.next_key(), p["length"]))

  def body(carry, step):
    x_slices, key = step
    outer = ctx.rng
    ctx.rng = key
    try:
      outs = eval_jaxpr(closed.jaxpr, closed.consts,
                        [*consts, *carry, *rebuild(list(x_slices))], ctx)
    finally:
      ctx.rng = outer
    return outs[:ncarry], outs[ncarry:]
  carry, ys = jax.lax.scan(body, list(init), (xs_flat, keys),
                           length=p["length"], reverse=p["reverse"],
                           unroll=p["unroll"])
  return [*carry, *ys]


def _cond(eqn, invals, ctx):
  index, ops = invals[0], invals[1:]
  flat, rebuild = _flatten(ops)
  branches = [
      (lambda br: lambda *f: eval_jaxpr(br.jaxpr, br.consts, rebuild(list(f)), ctx))(br)
      for br in eqn.params["branches"]]
  return list(jax.lax.switch(index, branches, *flat))


def _while(eqn, invals, ctx):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
  init = [_concrete(x, ctx, "while carry") for x in invals[cn + bn:]]
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
  cond = lambda c: eval_jaxpr(cj.jaxpr, cj.consts, [*cconsts, *c], ctx)[0]
  body = lambda c: eval_jaxpr(bj.jaxpr, bj.consts, [*bconsts, *c], ctx)
  return list(jax.lax.while_loop(cond, body, init))


_RULES = {
    "transpose": _transpose,
    "convert_element_type": _convert,
    "copy": _identity,
    "copy_p": _identity,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "pjit": _inline,
    "jit": _inline,
    "closed_call": _inline,
    "core_call": _inline,
    "remat2": _remat,
    "checkpoint": _remat,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
}


def factored_apply(fn, base, delta_by_path: dict, args, kwargs, *,
                   strict=False, report: Report | None = None,
                   choose: Callable | None = None, rng=None):
  """Evaluates ``fn(merge(base, delta), *args, **kwargs)`` in factored form."""
  closed, inputs, out_tree = trace(fn, base, args, kwargs)
  ctx = _Context(strict, report if report is not None else Report(), choose,
                 rng)
  paths = [p for p, _ in leaves_with_paths(base)]
  for i, path in enumerate(paths):
    d = delta_by_path.get(path)
    if d is not None:
      inputs[i] = Lora(inputs[i], d.a, d.b, d.scale, d.layout, path,
                       d.magnitude, d.dropout)
  outs = eval_jaxpr(closed.jaxpr, closed.consts, inputs, ctx)
  return jax.tree.unflatten(out_tree, outs)


# ---- choosing an engine per consumer ----------------------------------------

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


def cheaper_engine(kind: str, x_shape, x_contract, lora: Lora) -> str:
  """``"merge"`` or ``"factored"`` for one consumer, by the cost model."""
  del kind
  lay = lora.layout
  batch, ins, outs = lay.sizes(lora.w.shape)
  tokens = math.prod(d for i, d in enumerate(x_shape) if i not in x_contract)
  cost = extra_flops(tokens, math.prod(ins), math.prod(outs),
                     lora.a.shape[-1], math.prod(batch))
  return ("merge" if cost["merge"] < FACTORED_FLOP_WEIGHT * cost["factored"]
          else "factored")
