"""Small helpers shared by the tests."""

import string
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj


def randomize(delta, seed=0, scale=0.3):
  """Gives every adapter random (non-zero) b, so the update is visible."""
  def fn(d):
    if not isinstance(d, lj.LoraDelta):
      return d
    key = jax.random.fold_in(jax.random.key(seed), d.b.size)
    return d.replace(b=scale * jax.random.normal(key, d.b.shape, d.b.dtype))
  return jax.tree.map(fn, delta, is_leaf=lambda x: isinstance(x, lj.LoraDelta))


def numpy_delta_weight(d: lj.LoraDelta) -> np.ndarray:
  """scale * a @ b by an einsum written out per axis, in float64."""
  lay = d.layout
  letters = iter(string.ascii_letters.replace("r", ""))
  name = {ax: next(letters) for ax in range(lay.ndim)}
  a_sub = "".join(name[ax] for ax in lay.batch + lay.inputs) + "r"
  b_sub = "".join(name[ax] for ax in lay.batch) + "r" + "".join(
      name[ax] for ax in lay.outputs)
  out = "".join(name[ax] for ax in range(lay.ndim))
  return d.scale * np.einsum(f"{a_sub},{b_sub}->{out}",
                             np.asarray(d.a, np.float64),
                             np.asarray(d.b, np.float64))


def tanh_stack(width: int, scale: float, tokens: int = 8):
  """``(fn, base, delta, x)``: four ``width x width`` kernels ``w0..w3``
  (normal * ``scale``) applied as ``x = tanh(x @ w_i)``, rank-8 adapters on
  each, ``tokens`` rows of input: a model whose parameters dominate."""
  k = jax.random.split(jax.random.key(0), 5)
  params = {f"w{i}": jax.random.normal(k[i], (width, width)) * scale
            for i in range(4)}

  def fn(p, x):
    for i in range(4):
      x = jnp.tanh(x @ p[f"w{i}"])
    return x
  x = jax.random.normal(k[4], (tokens, width))
  base, delta = lj.split(params, lj.LoraConfig(rank=8, targets=r"w\d"),
                         jax.random.key(1))
  return fn, base, delta, x


def train_mse(apply, base, delta, x, y, steps=40):
  """Adam (1e-2) on ``mean((apply(base, delta, x) - y)^2)`` over ``delta``;
  returns the loss at each step."""
  tx = optax.adam(1e-2)

  @jax.jit
  def step(delta, opt, base):
    l, g = jax.value_and_grad(
        lambda d: jnp.mean((apply(base, d, x) - y) ** 2))(delta)
    u, opt = tx.update(g, opt, delta)
    return optax.apply_updates(delta, u), opt, l
  opt, losses = tx.init(delta), []
  for _ in range(steps):
    delta, opt, l = step(delta, opt, base)
    losses.append(float(l))
  return losses


def weighted_sin_loss(apply, base, args):
  """``delta -> sum over outputs of sin(out) * (1 + i % 3)``: a scalar whose
  gradient reaches every output entry, with unequal weights (a plain sum
  would let errors cancel)."""
  def loss(delta):
    out = apply(base, delta, *args)
    return sum(jnp.sum(jnp.sin(o) * (1 + jnp.arange(o.size).reshape(o.shape) % 3))
               for o in jax.tree.leaves(out))
  return loss


def assert_close(x, y, rtol=1e-5, atol=None):
  """Trees equal leaf by leaf to ``rtol``, with an absolute floor of ``rtol *
  max|y|`` per leaf (the engines round differently, so tiny entries of a
  large gradient may differ by more than ``rtol`` of themselves)."""
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    b = np.asarray(b)
    floor = rtol * float(np.abs(b).max()) if atol is None else atol
    np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=floor)


def assert_engines_agree(fn, base, delta, args, mode="factored", rtol=1e-5,
                         outputs=True):
  """``wrap(fn, mode, strict=True)`` (jitted) equals the merge engine: its
  outputs (unless ``outputs=False``) and the gradients of
  :func:`weighted_sin_loss` with respect to ``delta``. Returns the
  gradients of ``mode``."""
  fact = lj.wrap(fn, mode, strict=True)
  merged = lj.wrap(fn, "merge")
  if outputs:
    assert_close(jax.jit(fact)(base, delta, *args),
                 merged(base, delta, *args), rtol)
  grads = jax.jit(jax.grad(weighted_sin_loss(fact, base, args)))(delta)
  assert_close(grads, jax.grad(weighted_sin_loss(merged, base, args))(delta),
               rtol)
  return grads


def make_mesh(shape=(4, 2), names=("data", "model"), explicit=()):
  """A mesh over the first ``prod(shape)`` CPU devices, the axes named in
  ``explicit`` ``AxisType.Explicit``, the others ``Auto``."""
  kinds = jax.sharding.AxisType
  types = tuple(kinds.Explicit if n in explicit else kinds.Auto for n in names)
  return jax.make_mesh(shape, names, axis_types=types,
                       devices=jax.devices()[:int(np.prod(shape))])


def safetensors_bytes(header: bytes, data: bytes) -> bytes:
  """A safetensors file from its JSON header and data section, by hand: the
  header's length (u64, little-endian), the header padded with spaces to a
  multiple of 8, the data."""
  header += b" " * (-len(header) % 8)
  return struct.pack("<Q", len(header)) + header + data


def spec_names(state):
  """``{path: partition spec entries}`` of an NNX state, read from its
  Variables' sharding metadata (``nnx.get_partition_spec``)."""
  from flax import nnx  # only the NNX tests need flax here
  return {"/".join(map(str, k)): tuple(v.value if hasattr(v, "value") else v)
          for k, v in nnx.to_flat_state(nnx.get_partition_spec(state))}
