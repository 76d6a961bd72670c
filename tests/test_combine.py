"""lj.combine: "cat" is the weighted sum of the updates exactly; "svd" is its
best low-rank approximation (Eckart-Young against numpy's SVD of the dense
float64 sum), per batch entry; mismatches are errors that name the path."""

import math

from cases import CASES
from helpers import numpy_delta_weight
from helpers import randomize
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import combine as combine_mod

WEIGHTS = (0.5, -1.25, 2.0)
RANKS = (2, 3, 1)
ALPHAS = (2.0, 5.0, 1.0)
NAMES = ["dense", "attention", "scan_remat", "transposed", "conv2d", "plain"]


def _deltas(case, ranks=RANKS, alphas=ALPHAS):
  out = []
  for k, (r, alpha) in enumerate(zip(ranks, alphas)):
    cfg = lj.LoraConfig(rank=r, alpha=alpha, targets=case.targets)
    _, d = lj.split(case.params, cfg, jax.random.key(10 + k),
                    apply_fn=case.fn, example_args=case.args)
    out.append(randomize(d, seed=k))
  return out


def _weighted_sum(deltas, weights, path):
  return sum(w * numpy_delta_weight(lj.adapters(d)[path])
             for d, w in zip(deltas, weights))


def _flat(layout, w):
  """numpy float64 ``(G, K, N)`` view of a kernel (Layout.flatten's math)."""
  batch, ins, outs = layout.sizes(w.shape)
  return np.transpose(w, layout.order).reshape(
      math.prod(batch), math.prod(ins), math.prod(outs))


@pytest.mark.parametrize("name", NAMES)
def test_cat_is_the_weighted_sum_exactly(name):
  deltas = _deltas(CASES[name])
  out, info = lj.combine(deltas, WEIGHTS, "cat", return_info=True)
  for path, got in lj.adapters(out).items():
    assert got.rank == sum(RANKS) and got.scale == 1.0
    assert got.layout == lj.adapters(deltas[0])[path].layout
    want = _weighted_sum(deltas, WEIGHTS, path)
    np.testing.assert_allclose(numpy_delta_weight(got), want, rtol=1e-5,
                               atol=1e-6)
    assert info[path] == 0.0


def test_cat_has_no_cross_terms():
  # PEFT's "linear" averages a's and b's separately; (a1+a2)(b1+b2) carries
  # a1 b2 + a2 b1. cat does not: the two orthogonal rank-1 updates add up.
  e = jnp.eye(4)
  d1 = {"w": lj.LoraDelta(e[:, :1], e[:1], scale=1.0)}
  d2 = {"w": lj.LoraDelta(e[:, 1:2], e[1:2], scale=3.0)}
  got = lj.combine([d1, d2], [1.0, 0.5])["w"].weight()
  want = np.diag([1.0, 1.5, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(got), want)
  linear = (e[:, :1] + e[:, 1:2]) @ (e[:1] + e[1:2])
  assert float(jnp.abs(linear - want).max()) == 1.0  # the pitfall, for contrast


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [1, 3])
def test_svd_error_is_the_discarded_singular_mass(name, rank):
  deltas = _deltas(CASES[name])
  out, info = lj.combine(deltas, WEIGHTS, "svd", rank=rank, return_info=True)
  for path, got in lj.adapters(out).items():
    layout = got.layout
    assert got.rank == rank and got.scale == 1.0
    want = _flat(layout, _weighted_sum(deltas, WEIGHTS, path))
    approx = _flat(layout, numpy_delta_weight(got))
    s = np.linalg.svd(want, compute_uv=False)  # (G, min(K, N))
    dropped = (s[:, rank:] ** 2).sum(-1)
    err = ((want - approx) ** 2).sum((-2, -1))
    total = (s ** 2).sum()
    # Eckart-Young per batch entry: ||W - W_r||_F^2 = sum_{i>r} sigma_i^2
    np.testing.assert_allclose(err, dropped, rtol=2e-3, atol=1e-6 * total)
    np.testing.assert_allclose(info[path], dropped.sum() / total, rtol=2e-3,
                               atol=1e-7)


def test_svd_at_the_summed_rank_is_exact():
  deltas = _deltas(CASES["attention"])
  out, info = lj.combine(deltas, WEIGHTS, "svd", rank=sum(RANKS),
                         return_info=True)
  for path, got in lj.adapters(out).items():
    np.testing.assert_allclose(numpy_delta_weight(got),
                               _weighted_sum(deltas, WEIGHTS, path),
                               rtol=1e-4, atol=1e-5)
    assert info[path] < 1e-10


def test_svd_above_the_available_rank_pads_with_zero_directions():
  d = {"w": lj.LoraDelta(jnp.ones((4, 1)), jnp.ones((1, 3)))}
  got = lj.combine([d], method="svd", rank=5)["w"]
  assert got.a.shape == (4, 5) and got.b.shape == (5, 3)
  np.testing.assert_allclose(got.weight(), jnp.ones((4, 3)), rtol=1e-6)
  assert float(jnp.abs(got.a[:, 3:]).max()) == 0.0


def test_factor_route_equals_the_dense_route():
  # Without forming K x N: QR of A and B^T, SVD of the R x R core.
  k = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(k[0], (2, 40, 5))
  b = jax.random.normal(k[1], (2, 5, 30))
  p, s, qt = combine_mod._core_svd(a, b)
  _, s_dense, _ = combine_mod._dense_svd(a, b)
  np.testing.assert_allclose(s, s_dense[:, :5], rtol=1e-5)
  assert p.shape == (2, 40, 5) and qt.shape == (2, 5, 30)
  np.testing.assert_allclose(p @ (s[..., None] * qt), a @ b, rtol=1e-4,
                             atol=1e-4)


def test_combine_of_a_stack_equals_combine_of_its_adapters():
  deltas = _deltas(CASES["attention"])
  stacked = lj.stack(deltas)
  back = [lj.select(stacked, k) for k in range(3)]
  got = lj.adapters(lj.combine(back, WEIGHTS))
  want = lj.adapters(lj.combine(deltas, WEIGHTS))
  for path in want:
    np.testing.assert_array_equal(got[path].a, want[path].a)
    np.testing.assert_array_equal(got[path].b, want[path].b)


def test_combined_adapter_runs_like_the_summed_update():
  case = CASES["dense"]
  deltas = _deltas(case)
  base, _ = case.split()
  out = lj.combine(deltas, WEIGHTS)
  got = lj.wrap(case.fn)(base, out, *case.args)
  kernel = np.asarray(case.params["kernel"], np.float64) + _weighted_sum(
      deltas, WEIGHTS, "kernel")
  want = case.fn({**case.params, "kernel": jnp.asarray(kernel, jnp.float32)},
                 *case.args)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _one(shape, layout=None, rank=2):
  layout = lj.Layout.dense() if layout is None else layout
  a_shape, b_shape = layout.factor_shapes(shape, rank)
  return lj.LoraDelta(jnp.ones(a_shape), jnp.ones(b_shape), layout=layout)


def test_errors_name_the_path():
  good = {"blk": {"q": _one((4, 3)), "v": _one((4, 3))}}
  with pytest.raises(ValueError, match=r"delta 1 adapts \['blk/q'\] but "
                     r"delta 0 adapts \['blk/q', 'blk/v'\]"):
    lj.combine([good, {"blk": {"q": _one((4, 3))}}])
  with pytest.raises(ValueError, match=r"delta 1 at 'blk/v' updates a kernel "
                     r"of shape \(5, 3\)"):
    lj.combine([good, {"blk": {"q": _one((4, 3)), "v": _one((5, 3))}}])
  tr = lj.Layout.transposed()
  with pytest.raises(ValueError, match=r"delta 1 at 'blk/q' updates a kernel "
                     r"of shape \(4, 3\) with Layout\(batch=\(\), inputs=\(1,\)"):
    lj.combine([good, {"blk": {"q": _one((4, 3), tr), "v": _one((4, 3))}}])
  dora = _one((4, 3)).replace(magnitude=jnp.ones(3))
  with pytest.raises(ValueError, match=r"delta 0 at 'blk/v' is DoRA.*not "
                     r"linear"):
    lj.combine([{"blk": {"q": _one((4, 3)), "v": dora}}])
  with pytest.raises(ValueError, match=r"2 deltas but 1 weights"):
    lj.combine([good, good], [1.0])
  with pytest.raises(ValueError, match=r"method='linear'; choose one of "
                     r"\('cat', 'svd'\)"):
    lj.combine([good], method="linear")
  with pytest.raises(ValueError, match=r"rank=2 is for method='svd'"):
    lj.combine([good], rank=2)
  with pytest.raises(ValueError, match=r"at 'blk/q' delta 1 has dropout 0.1"):
    lj.combine([good, {"blk": {"q": _one((4, 3)).replace(dropout=0.1),
                               "v": _one((4, 3))}}])
