"""lj.combine: "cat" is the weighted sum of the updates exactly; "svd" is its
best low-rank approximation (Eckart-Young against numpy's SVD of the dense
float64 sum), per batch entry; PEFT's factor-wise (linear, ties,
magnitude_prune) and dense (*_svd) merges against their rules written out in
numpy; DARE's statistics; mismatches are errors that name the path or the
argument. Parity with PEFT itself: tests/test_peft_merges.py."""

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


_MADE = {}


def _deltas(case, ranks=RANKS, alphas=ALPHAS):
  """Random adapters of a case, made once per module (split traces)."""
  if (case.name, ranks, alphas) not in _MADE:
    _MADE[case.name, ranks, alphas] = _make(case, ranks, alphas)
  return _MADE[case.name, ranks, alphas]


def _make(case, ranks, alphas):
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
  with pytest.raises(ValueError, match=r"method='mean'; choose one of "
                     r"\('cat', 'linear', 'ties'"):
    lj.combine([good], method="mean")
  with pytest.raises(ValueError, match=r"rank=2 is for the SVD methods.*"
                     r"'cat' is exact"):
    lj.combine([good], rank=2)
  with pytest.raises(ValueError, match=r"rank=2 is for the SVD methods.*"
                     r"'ties' keeps the adapters' \(equal\) rank"):
    lj.combine([good], method="ties", rank=2, density=0.5)
  with pytest.raises(ValueError, match=r"at 'blk/q' delta 1 has dropout 0.1"):
    lj.combine([good, {"blk": {"q": _one((4, 3)).replace(dropout=0.1),
                               "v": _one((4, 3))}}])


# ------------------------------------------- PEFT's merges, rule by rule


def _np_magnitude_prune(x, density):
  """PEFT's magnitude_based_pruning of each row of ``x (G, M)``."""
  if density >= 1:
    return x
  k = int(density * x.shape[-1])
  out = np.zeros_like(x)
  for g in range(x.shape[0]):
    top = np.argsort(-np.abs(x[g]), kind="stable")[:k]
    out[g, top] = x[g, top]
  return out


def _np_merge(rule, xs, ws, density=1.0, sign_method="total"):
  """merge_utils' task_arithmetic / magnitude_prune / ties over tensors
  ``xs`` (each ``(G, M)``, float64), one tensor per row ``g``."""
  if rule in ("ties", "magnitude_prune"):
    xs = [_np_magnitude_prune(x, density) for x in xs]
  x = np.stack(xs)
  weighted = x * np.asarray(ws, np.float64)[:, None, None]
  if rule in ("linear", "magnitude_prune"):
    return weighted.sum(0)
  sign = np.sign(x)
  votes = x.sum(0) if sign_method == "total" else sign.sum(0)
  agree = sign == np.where(votes >= 0, 1, -1)
  return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


def _equal_rank_deltas(name):
  return _deltas(CASES[name], ranks=(2, 2, 2))


@pytest.mark.parametrize("method,density,sign", [
    ("linear", None, "total"), ("ties", 0.4, "total"),
    ("ties", 0.6, "frequency"), ("magnitude_prune", 0.5, "total")])
@pytest.mark.parametrize("name", ["scan_remat", "conv2d"])
def test_factorwise_methods_are_peft_rules_on_a_and_b(name, method, density,
                                                      sign):
  deltas = _equal_rank_deltas(name)
  out = lj.combine(deltas, WEIGHTS, method, density=density,
                   majority_sign_method=sign)
  for path, got in lj.adapters(out).items():
    ds = [lj.adapters(d)[path] for d in deltas]
    ws = [w * d.scale for w, d in zip(WEIGHTS, ds)]
    root = [abs(v) ** 0.5 for v in ws]
    signed = [r if v >= 0 else -r for r, v in zip(root, ws)]
    g = math.prod(got.a.shape[:len(got.layout.batch)])
    for side, weights in (("a", signed), ("b", root)):
      xs = [np.asarray(getattr(d, side), np.float64).reshape(g, -1)
            for d in ds]
      want = _np_merge(method, xs, weights, density or 1.0, sign)
      np.testing.assert_allclose(
          np.asarray(getattr(got, side)).reshape(g, -1), want, rtol=1e-5,
          atol=1e-6, err_msg=f"{path} {side}")
    assert got.scale == 1.0 and got.rank == 2


@pytest.mark.parametrize("method,density", [("ties_svd", 0.3),
                                            ("magnitude_prune_svd", 0.5)])
def test_svd_methods_truncate_the_merged_updates(method, density):
  deltas = _deltas(CASES["attention"])  # ranks differ: allowed here
  out, info = lj.combine(deltas, WEIGHTS, method, rank=2, density=density,
                         return_info=True)
  for path, got in lj.adapters(out).items():
    layout = got.layout
    ws = [_flat(layout, numpy_delta_weight(lj.adapters(d)[path]))
          for d in deltas]
    shape = ws[0].shape
    merged = _np_merge(method.removesuffix("_svd"),
                       [w.reshape(shape[0], -1) for w in ws], WEIGHTS,
                       density).reshape(shape)
    u, s, vt = np.linalg.svd(merged, full_matrices=False)
    want = (u[..., :2] * s[:, None, :2]) @ vt[:, :2]
    approx = _flat(layout, numpy_delta_weight(got))
    np.testing.assert_allclose(approx, want, rtol=1e-4,
                               atol=1e-5 * np.abs(merged).max())
    np.testing.assert_allclose(info[path], (s[:, 2:] ** 2).sum() /
                               (s ** 2).sum(), rtol=1e-3, atol=1e-7)
    assert got.rank == 2 and got.scale == 1.0


def test_density_one_prunes_nothing_as_peft():
  deltas = _equal_rank_deltas("conv2d")
  lin = lj.adapters(lj.combine(deltas, WEIGHTS, "linear"))
  key = jax.random.key(3)
  for method in ("magnitude_prune", "dare_linear"):
    got = lj.adapters(lj.combine(deltas, WEIGHTS, method, density=1.0,
                                 key=key if "dare" in method else None))
    for path in lin:
      np.testing.assert_array_equal(got[path].a, lin[path].a)
      np.testing.assert_array_equal(got[path].b, lin[path].b)


def test_dare_statistics():
  # Each entry kept with probability density, rescaled: about 1 - density of
  # a factor's entries are zero, and the mean over keys is "linear" (a's and
  # b's masks are independent, so E[a] @ E[b] is linear's product).
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  ds = [{"w": lj.LoraDelta(f(32, 4), f(4, 24), scale=s)} for s in (0.5, 2.0)]
  w = [1.5, -0.5]
  density = 0.5
  keys = jax.random.split(jax.random.key(0), 1000)
  one = jax.jit(jax.vmap(lambda k: lj.combine(
      ds[:1], [1.0], "dare_linear", density=density, key=k)["w"]))(keys)
  for x in (one.a, one.b):
    zero = float(jnp.mean(x == 0))
    assert abs(zero - (1 - density)) < 0.01, zero
  # the same key gives the same mask; another key another one
  again = lj.combine(ds[:1], [1.0], "dare_linear", density=density,
                     key=keys[0])["w"]
  np.testing.assert_allclose(again.a, one.a[0], rtol=1e-6)  # jit vs eager
  assert float(jnp.mean(one.a[0] == one.a[1])) < 0.7
  weight = jax.jit(jax.vmap(lambda k: lj.combine(
      ds, w, "dare_linear", density=density, key=k)["w"].weight()))(keys)
  linear = lj.combine(ds, w, "linear")["w"].weight()
  err = jnp.linalg.norm(weight.mean(0) - linear) / jnp.linalg.norm(linear)
  # ~0.05 = one draw's error (~1.5: the test is not vacuous) / sqrt(1000)
  assert float(err) < 0.08, float(err)
  assert float(jnp.linalg.norm(weight[0] - linear) /
               jnp.linalg.norm(linear)) > 1.0
  # dare_linear_svd at full rank is the pruned dense sum: an entry is zero
  # (up to the SVD's float32 rounding) when both adapters' masks drop it
  zeros = []
  for k in keys[:6]:
    x = jnp.abs(lj.combine(ds, w, "dare_linear_svd", rank=24, density=density,
                           key=k)["w"].weight())
    zeros.append(float(jnp.mean(x < 1e-4 * x.max())))
  assert abs(np.mean(zeros) - (1 - density) ** 2) < 0.02, zeros


def test_dare_ties_elects_signs_after_dropping():
  rng = np.random.default_rng(1)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  ds = [{"w": lj.LoraDelta(f(6, 2), f(2, 5))} for _ in range(3)]
  key = jax.random.key(7)
  got = lj.combine(ds, WEIGHTS, "dare_ties", density=0.5, key=key)["w"]
  # the masks combine draws: the path's key, split for a and b
  ka, kb = jax.random.split(jax.random.fold_in(key, 0))
  for side, k, ws in (("a", ka, [np.sign(w) * abs(w) ** 0.5 for w in WEIGHTS]),
                      ("b", kb, [abs(w) ** 0.5 for w in WEIGHTS])):
    x = np.stack([np.asarray(getattr(d["w"], side)).reshape(1, -1)
                  for d in ds])
    keep = np.asarray(jax.random.bernoulli(k, 0.5, x.shape))
    pruned = [np.where(keep[i], x[i] / 0.5, 0) for i in range(3)]
    want = _np_merge("ties", pruned, ws, 1.0)
    np.testing.assert_allclose(np.asarray(getattr(got, side)).reshape(1, -1),
                               want, rtol=1e-5, atol=1e-6)


def test_merge_errors_name_the_argument():
  good = {"blk": {"q": _one((4, 3)), "v": _one((4, 3))}}
  other = {"blk": {"q": _one((4, 3)), "v": _one((4, 3), rank=3)}}
  with pytest.raises(ValueError, match=r"method='ties' adds the factors entry "
                     r"by entry and needs equal ranks.*at 'blk/v' delta 0 has "
                     r"rank 2 and delta 1 rank 3. Use 'cat' or 'svd' or "
                     r"'ties_svd'"):
    lj.combine([good, other], method="ties", density=0.5)
  with pytest.raises(ValueError, match=r"method='ties' needs density"):
    lj.combine([good, good], method="ties")
  with pytest.raises(ValueError, match=r"density=1.5; give the fraction"):
    lj.combine([good, good], method="magnitude_prune_svd", density=1.5)
  with pytest.raises(ValueError, match=r"density=0; .*\(0, 1\] \(DARE "
                     r"divides by it\)"):
    lj.combine([good, good], method="dare_linear", density=0,
               key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"density=0.5 is for the pruning "
                     r"methods; 'linear' prunes nothing"):
    lj.combine([good, good], method="linear", density=0.5)
  with pytest.raises(ValueError, match=r"method='dare_ties_svd' drops entries "
                     r"at random; give key="):
    lj.combine([good, good], method="dare_ties_svd", density=0.5)
  with pytest.raises(ValueError, match=r"key is for the DARE methods; 'ties' "
                     r"is deterministic"):
    lj.combine([good, good], method="ties", density=0.5,
               key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"weights\[1\] is nan; give finite"):
    lj.combine([good, good], [1.0, float("nan")], method="linear")
  with pytest.raises(ValueError, match=r"majority_sign_method='count'"):
    lj.combine([good, good], method="ties", density=0.5,
               majority_sign_method="count")


def test_non_finite_factors_are_refused_by_name():
  good = {"blk": {"q": _one((4, 3))}}
  bad = _one((4, 3))
  bad = bad.replace(b=bad.b.at[1, 2].set(jnp.nan))
  for method, kw in (("cat", {}), ("ties", {"density": 0.5})):
    with pytest.raises(ValueError, match=r"delta 1 at 'blk/q' has NaN or inf "
                       r"in its factors"):
      lj.combine([good, {"blk": {"q": bad}}], method=method, **kw)


def test_bf16_factors_stay_bf16():
  rng = np.random.default_rng(2)
  ds = [{"w": lj.LoraDelta(
      jnp.asarray(rng.normal(size=(6, 2)), jnp.bfloat16),
      jnp.asarray(rng.normal(size=(2, 5)), jnp.bfloat16), scale=s)}
      for s in (0.5, 2.0)]
  # linear in bf16 equals the float32 computation rounded
  f32 = [{"w": d["w"].replace(a=d["w"].a.astype(jnp.float32),
                              b=d["w"].b.astype(jnp.float32))} for d in ds]
  want = lj.combine(f32, [1.0, -0.5], "linear")["w"]
  got = lj.combine(ds, [1.0, -0.5], "linear")["w"]
  assert got.a.dtype == got.b.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.a, want.a.astype(jnp.bfloat16))
  np.testing.assert_array_equal(got.b, want.b.astype(jnp.bfloat16))


def test_trainable_tokens_and_trained_arrays_are_refused_not_dropped():
  # Keeping delta 0's token rows would silently drop delta 1's.
  d = {"q": _one((4, 3))}
  rows = {**d, "embed": lj.TrainableTokens(jnp.ones((1, 3)), (2,), vocab=5)}
  with pytest.raises(ValueError, match=r"delta 1 holds a TrainableTokens at "
                     r"'embed'"):
    lj.combine([{**d, "embed": None}, rows])
  with pytest.raises(ValueError, match=r"delta 0 holds a ArrayImpl at 'bias'|"
                     r"delta 0 holds a \w+ at 'bias'"):
    lj.combine([{**d, "bias": jnp.ones(3)}, {**d, "bias": jnp.ones(3)}])
  # Without them the adapters combine as before: the weighted sum.
  both = lj.combine([d, d], [1.0, 2.0])
  np.testing.assert_allclose(both["q"].weight(), 3 * d["q"].weight(),
                             rtol=1e-6)
