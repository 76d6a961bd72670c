"""Small helpers shared by the tests."""

import string

import jax
import numpy as np

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
