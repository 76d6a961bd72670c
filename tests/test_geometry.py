"""Layout's axis computations and dora.py, against numpy written per axis."""

import string

from helpers import numpy_delta_weight
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import dora  # the module under test; not public API

LAYOUTS = [  # (layout, kernel shape)
    (lj.Layout.dense(), (5, 4)),
    (lj.Layout.transposed(), (4, 5)),
    (lj.Layout((0,), (1,), (2,)), (3, 5, 4)),          # stacked layers
    (lj.Layout((), (0, 1), (2,)), (2, 3, 4)),          # attention out
    (lj.Layout((), (0,), (1, 2)), (5, 2, 3)),          # attention q
    (lj.Layout((), (0, 1, 2), (3,)), (3, 3, 2, 4)),    # conv HWIO
    (lj.Layout((2,), (0,), (3, 1)), (5, 3, 2, 4)),     # scrambled roles
]


def _names(lay):
  letters = iter(string.ascii_lowercase)
  return {ax: next(letters) for ax in range(lay.ndim)}


def _numpy_flatten(w, lay):
  """(G, K, N) by an einsum that names every axis."""
  n = _names(lay)
  src = "".join(n[ax] for ax in range(lay.ndim))
  dst = "".join(n[ax] for ax in lay.batch + lay.inputs + lay.outputs)
  m = np.einsum(f"{src}->{dst}", w)
  size = lambda axes: int(np.prod([w.shape[ax] for ax in axes]))
  return m.reshape(size(lay.batch), size(lay.inputs), size(lay.outputs))


def _w(shape, seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape))


@pytest.mark.parametrize("lay, shape", LAYOUTS)
def test_flatten_unflatten_and_out_in(lay, shape):
  w = _w(shape)
  m = lay.flatten(jnp.asarray(w))
  np.testing.assert_array_equal(m, _numpy_flatten(w, lay))
  np.testing.assert_array_equal(lay.unflatten(m, shape), w)
  out_in = lay.to_out_in(jnp.asarray(w))
  np.testing.assert_array_equal(out_in, np.swapaxes(_numpy_flatten(w, lay), 1, 2))
  np.testing.assert_array_equal(lay.from_out_in(out_in, shape), w)


def test_out_in_is_torch_linear_weight():
  w = _w((5, 3))  # Flax Dense kernel (in, out)
  np.testing.assert_array_equal(lj.Layout.dense().to_out_in(jnp.asarray(w))[0], w.T)
  np.testing.assert_array_equal(  # a kernel stored (out, in) already is one
      lj.Layout.transposed().to_out_in(jnp.asarray(w))[0], w)


@pytest.mark.parametrize("lay, shape", LAYOUTS)
def test_factor_positions_shapes_and_out_in_factors(lay, shape):
  a_shape, b_shape = lay.factor_shapes(shape, 2)
  a, b = _w(a_shape, 1), _w(b_shape, 2)
  in_a, in_b, r_a, r_b = lay.factor_positions()
  assert a.shape[r_a] == 2 and b.shape[r_b] == 2
  for k, i in in_a.items():
    assert a.shape[i] == shape[k] and k not in lay.outputs
  for k, i in in_b.items():
    assert b.shape[i] == shape[k] and k not in lay.inputs
  assert set(in_a) | set(in_b) == set(range(lay.ndim))
  assert lay.kernel_shape(a_shape, b_shape) == shape
  d = lj.LoraDelta(jnp.asarray(a), jnp.asarray(b), scale=0.5, layout=lay)
  want = numpy_delta_weight(d)
  np.testing.assert_allclose(d.weight(), want, rtol=1e-5, atol=1e-6)
  # PEFT: delta W^T = scale * lora_B @ lora_A, per batch entry
  lora_a, lora_b = lay.factors_to_out_in(d.a, d.b)
  np.testing.assert_allclose(0.5 * np.asarray(lora_b @ lora_a),
                             np.swapaxes(_numpy_flatten(want, lay), 1, 2),
                             rtol=1e-5, atol=1e-6)
  a2, b2 = lay.factors_from_out_in(lora_a, lora_b, shape)
  np.testing.assert_array_equal(a2, a)
  np.testing.assert_array_equal(b2, b)


@pytest.mark.parametrize("lay, shape", LAYOUTS)
def test_broadcast_outputs(lay, shape):
  batch, _, outs = lay.sizes(shape)
  values = _w((*batch, *outs), 3)
  got = np.asarray(lay.broadcast_outputs(jnp.asarray(values)))
  assert got.shape == tuple(1 if k in lay.inputs else shape[k]
                            for k in range(lay.ndim))
  n = _names(lay)
  src = "".join(n[ax] for ax in lay.batch + lay.outputs)
  dst = "".join(n[ax] for ax in range(lay.ndim) if ax not in lay.inputs)
  np.testing.assert_array_equal(got.reshape(np.einsum(f"{src}->{dst}", values).shape),
                                np.einsum(f"{src}->{dst}", values))
  for k in range(lay.ndim):
    axis = lay.magnitude_axis(k)
    assert (axis is None) == (k in lay.inputs)
    if axis is not None:
      assert values.shape[axis] == shape[k]


@pytest.mark.parametrize("lay, shape", LAYOUTS)
def test_dora_norm_merge_unmerge(lay, shape):
  w0 = _w(shape, 4)
  a_shape, b_shape = lay.factor_shapes(shape, 2)
  d = lj.LoraDelta(jnp.asarray(_w(a_shape, 5)), jnp.asarray(_w(b_shape, 6)),
                   scale=0.7, layout=lay)
  v = w0 + numpy_delta_weight(d)
  inputs = tuple(lay.inputs)
  n = np.sqrt(np.sum(v * v, axis=inputs))  # kept axes in kernel order
  # ... rearranged to (*batch, *out), the order of the layout's tuples
  kept = [k for k in range(lay.ndim) if k not in lay.inputs]
  names = _names(lay)
  n_fo = np.einsum("".join(names[k] for k in kept) + "->"
                   + "".join(names[k] for k in lay.batch + lay.outputs), n)
  np.testing.assert_allclose(dora.norm(jnp.asarray(w0), d), n_fo, rtol=1e-5)
  m = jnp.asarray(n_fo * 1.5, jnp.float32)
  dd = d.replace(magnitude=m)
  np.testing.assert_allclose(dora.output_factor(jnp.asarray(w0), dd, jnp.float32),
                             np.full(n_fo.shape, 1.5), rtol=1e-5)
  merged = dora.adapted_weight(jnp.asarray(w0, jnp.float32), dd)
  np.testing.assert_allclose(merged, 1.5 * v, rtol=1e-4, atol=1e-5)
  back = dora.unmerged_weight(merged, dd, dora.norm(jnp.asarray(w0), d))
  np.testing.assert_allclose(back, w0, rtol=1e-4, atol=1e-5)
  # plain LoRA: the same two functions without a magnitude
  np.testing.assert_allclose(
      dora.unmerged_weight(dora.adapted_weight(jnp.asarray(w0), d), d), w0,
      rtol=1e-5, atol=1e-5)


def test_layout_errors_name_the_leaf():
  params = {"blocks": {"w": jnp.ones((3, 4, 5))}}
  cfg = lj.LoraConfig(rank=2, targets="blocks/w",
                      layouts={"blocks/.*": lj.Layout.dense()})
  with pytest.raises(ValueError, match=r"'blocks/w'"):
    lj.split(params, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=(
      r"The layout of 'mlp/kernel' \(Layout\(batch=\(\), inputs=\(0,\), "
      r"outputs=\(1,\)\)\) is for a kernel of 2 axes but the kernel has shape "
      r"\(4, 3, 2\)")):
    lj.Layout.dense().check_kernel((4, 3, 2), "mlp/kernel")
  with pytest.raises(ValueError, match=r"rank 9 is larger than the smaller "
                     r"side \(4\) of 'blocks/w'"):
    lj.split(params, lj.LoraConfig(rank=9, targets="blocks/w", layouts={
        "blocks/w": lj.Layout((0,), (1,), (2,))}), jax.random.key(0))


@pytest.mark.parametrize("data", [
    None, {"batch": [], "inputs": [0]}, {"batch": [], "inputs": [0.5], "outputs": [1]},
    {"batch": None, "inputs": [0], "outputs": [1]}])
def test_layout_from_json_rejects(data):
  with pytest.raises(ValueError, match="not a layout"):
    lj.Layout.from_json(data)


def test_place_outputs_matches_a_dot_output():
  """DoRA's per-output factor placed on y = dot_general(x, w) equals scaling
  the kernel's columns before the dot."""
  lay = lj.Layout((0,), (1,), (3, 2))            # (layers, in, out2, out1)
  w = _w((3, 4, 2, 5), 7)
  x = _w((3, 6, 4), 8)                           # (layers, tokens, in)
  m = _w((3, 5, 2), 9)                           # (*batch, *out) factor order
  y = np.einsum("lti,liba->ltba", x, w)          # kernel axes 2, 3 at 2, 3
  got = np.asarray(lay.place_outputs(jnp.asarray(m), {0: 0, 2: 2, 3: 3}, 4))
  want = np.einsum("lti,liba->ltba", x, w * np.asarray(lay.broadcast_outputs(
      jnp.asarray(m))))
  np.testing.assert_allclose(y * got, want, rtol=1e-5, atol=1e-5)
