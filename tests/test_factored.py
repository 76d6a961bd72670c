"""The factored engine computes what the merge engine computes."""

import collections
import re
import warnings

from cases import CASES
import flax.linen as nn
from helpers import assert_close
from helpers import assert_engines_agree
from helpers import randomize
from helpers import weighted_sin_loss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

# lowrank.REDUCE_MAX_RANK is internal: the gradient test checks both forms run.
from lora_jax._src import factored


@pytest.mark.parametrize("name", list(CASES))
def test_factored_equals_merge_outputs_and_grads(name):
  case = CASES[name]
  base, delta = case.split(rank=2)
  delta = randomize(delta)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback anywhere in the suite
    g_f = assert_engines_agree(case.fn, base, delta, case.args)
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_f))


@pytest.mark.parametrize("name", list(CASES))
def test_factored_identity_at_init(name):
  case = CASES[name]
  base, delta = case.split(rank=2)
  got = jax.jit(lj.wrap(case.fn, "factored"))(base, delta, *case.args)
  want = jax.jit(case.fn)(case.params, *case.args)
  assert_close(got, want, rtol=0, atol=0)


def test_explain_names_rules():
  case = CASES["tied_embedding"]
  base, delta = case.split(rank=2)
  report = lj.explain(case.fn, base, delta, *case.args, mode="factored")
  assert report.rules == {
      "Embed_0/embedding": ["gather", "dot_general (transposed use)"],
      "Dense_0/kernel": ["dot_general"]}
  assert report.fallbacks == {}


def _cumsum_model():
  params = {"w": jax.random.normal(jax.random.key(0), (6, 4))}
  fn = lambda p, x: x @ jnp.cumsum(p["w"], axis=0) + x @ p["w"]
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="w"),
                         jax.random.key(1))
  return fn, base, randomize(delta), jnp.ones((3, 6))


def test_fallback_is_counted_warned_and_correct():
  fn, base, delta, x = _cumsum_model()
  with pytest.warns(UserWarning, match="'cumsum' consumes 'w'.*merging"):
    got = lj.wrap(fn, "factored")(base, delta, x)
  np.testing.assert_allclose(got, lj.wrap(fn, "merge")(base, delta, x), rtol=1e-5)
  report = lj.explain(fn, base, delta, x, mode="factored")
  assert report.fallbacks == {("w", "cumsum"): 1}
  assert report.rules["w"] == ["merge-fallback (cumsum)", "dot_general"]
  g = jax.grad(lambda d: lj.wrap(fn, "factored")(base, d, x).sum())(delta)
  gm = jax.grad(lambda d: lj.wrap(fn, "merge")(base, d, x).sum())(delta)
  assert_close(g, gm)


def test_strict_raises():
  fn, base, delta, x = _cumsum_model()
  with pytest.raises(lj.FallbackError, match="no factored rule for 'cumsum' consuming 'w'"):
    lj.wrap(fn, "factored", strict=True)(base, delta, x)


class _RematMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    block = nn.remat(nn.Dense)
    return block(8)(nn.gelu(block(8)(x)))


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable,
                                    jax.checkpoint_policies.dots_saveable])
def test_jax_checkpoint_and_nn_remat(policy):
  model = _RematMLP()
  x = jax.random.normal(jax.random.key(0), (4, 8))
  params = model.init(jax.random.key(1), x)["params"]
  fn = lambda p, x: jax.checkpoint(
      lambda p, x: model.apply({"params": p}, x), policy=policy)(p, x)
  base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(2),
                         apply_fn=fn, example_args=(x,))
  delta = randomize(delta)
  for mode in ("factored", "auto"):
    assert_engines_agree(fn, base, delta, (x,), mode, outputs=False)
  # the remat survives: the factored jaxpr still holds a checkpoint
  jaxpr = jax.make_jaxpr(jax.grad(weighted_sin_loss(
      lj.wrap(fn, "factored"), base, (x,))))(delta)
  assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_cond_and_while_loop():
  params = {"w": jax.random.normal(jax.random.key(0), (5, 5)) * 0.3}
  def fn(p, x, flag):
    y = jax.lax.cond(flag, lambda x: x @ p["w"], lambda x: -x @ p["w"].T, x)
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), y)
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="w"),
                         jax.random.key(1))
  delta = randomize(delta)
  x = jnp.ones((2, 5))
  for flag in (True, False):
    args = (x, jnp.asarray(flag))
    assert_engines_agree(fn, base, delta, args)


def test_static_python_arguments_stay_static():
  model = nn.Dropout(rate=0.5)
  class M(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic):
      return nn.Dropout(0.5)(nn.Dense(4)(x), deterministic=deterministic)
  m = M()
  x = jnp.ones((2, 4))
  params = m.init(jax.random.key(0), x, True)["params"]
  fn = lambda p, x, deterministic: m.apply({"params": p}, x, deterministic)
  base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(1))
  delta = randomize(delta)
  assert_close(lj.wrap(fn, "factored")(base, delta, x, deterministic=True),
                lj.wrap(fn, "merge")(base, delta, x, deterministic=True))
  del model


def test_auto_picks_merge_for_few_tokens_and_high_rank():
  """At 512 tokens of a 64x64 kernel, rank 2 stays factored and rank 32 is
  merged; either way auto computes what merge does."""
  params = {"w": jax.random.normal(jax.random.key(2), (64, 64))}
  fn = lambda p, x: x @ p["w"]
  x = jax.random.normal(jax.random.key(3), (512, 64))
  for rank, want in ((2, "dot_general"), (32, "merge (auto: cheaper)")):
    base, delta = lj.split(params, lj.LoraConfig(rank=rank, targets="w"),
                           jax.random.key(0))
    delta = randomize(delta)
    assert lj.explain(fn, base, delta, x, mode="auto").rules["w"] == [want]
    assert_close(lj.wrap(fn, "auto")(base, delta, x),
                  fn(lj.merge(base, delta), x))


@pytest.mark.parametrize("rank", [8, 256])
def test_both_factor_gradient_forms_equal_the_math(rank):
  # Rank <= REDUCE_MAX_RANK on CPU takes the fused multiply-reduce form of
  # x^T g; rank 256 takes the GEMM. Both equal the hand-written gradients.
  k, n, m = 300, 40, 24
  keys = jax.random.split(jax.random.key(rank), 5)
  w = jax.random.normal(keys[0], (k, n))
  x = jax.random.normal(keys[1], (m, k))
  a = jax.random.normal(keys[2], (k, rank)) / k
  b = jax.random.normal(keys[3], (rank, n)) / rank
  g = jax.random.normal(keys[4], (m, n))
  base = {"w": w}
  delta = {"w": lj.LoraDelta(a, b, scale=0.5)}
  fn = lambda p, x: x @ p["w"]
  loss = lambda d, x: jnp.sum(lj.wrap(fn, "factored", strict=True)(base, d, x) * g)
  (gd, gx) = jax.jit(jax.grad(loss, argnums=(0, 1)))(delta, x)
  x64, a64, b64, g64, w64 = (np.asarray(v, np.float64) for v in (x, a, b, g, w))
  want_da = 0.5 * x64.T @ g64 @ b64.T
  want_db = 0.5 * (x64 @ a64).T @ g64
  want_dx = g64 @ (w64 + 0.5 * a64 @ b64).T
  np.testing.assert_allclose(gd["w"].a, want_da, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gd["w"].b, want_db, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx, want_dx, rtol=1e-4, atol=1e-4)
  assert (rank <= factored.lowrank.REDUCE_MAX_RANK) == (rank == 8)


@pytest.mark.parametrize("consts", [(0.5, 0.5, 0.5, 0.5), (0.5, 0.5, -0.5, 0.5),
                                    (0.5, -0.5, 2.0, 0.0)])
def test_plain_runs_of_equal_layers_share_one_traced_function(consts,
                                                              monkeypatch):
  """The equations between adapted matmuls are the same in every layer of a
  deep model: each run of them is traced once, under a key that tells
  apart anything the run computes with (here the literal each layer
  multiplies by). Sharing wrongly would use another layer's constant;
  gradients equal the merge engine's whatever is shared."""
  from lora_jax._src.factored import segments
  monkeypatch.setattr(segments, "_RUNS", collections.OrderedDict())
  seen = {"runs": 0, "traced": 0}
  real_eval, real_fn = segments.evaluate_run, segments._run_fn
  monkeypatch.setattr(segments, "evaluate_run", lambda *a: (
      seen.__setitem__("runs", seen["runs"] + 1), real_eval(*a))[1])
  monkeypatch.setattr(segments, "_run_fn", lambda *a: (
      seen.__setitem__("traced", seen["traced"] + 1), real_fn(*a))[1])
  c0, c1, c2, c3 = consts

  def fn(p, x):
    for i, c in enumerate((c0, c1, c2, c3)):  # literals: static per layer
      h = x @ p[f"w{i}"]
      x = x + jnp.tanh(h) * c - jnp.sin(h) * 0.25
    return x

  params = {f"w{i}": jax.random.normal(jax.random.key(i), (8, 8)) * 0.3
            for i in range(4)}
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets=r"w\d"),
                         jax.random.key(9))
  delta = randomize(delta, scale=0.3)
  x = jax.random.normal(jax.random.key(5), (4, 8))
  loss = lambda mode: lambda d: jnp.sum(jnp.cos(lj.wrap(
      fn, mode, recompute=False)(base, d, x)))
  g = jax.jit(jax.grad(loss("factored")))(delta)
  g_merge = jax.grad(loss("merge"))(delta)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_merge)):
    assert_close(a, b, rtol=1e-4, atol=1e-5)
  # a run after each matmul (to the next one, or to the output): the same
  # equations, so the layers multiplying by the same literal share one
  assert seen == {"runs": 4, "traced": len({repr(c) for c in consts})}, seen


def test_plain_runs_of_an_eager_call_compute_as_merge_binds_them():
  """Called eagerly (concrete values), runs of plain equations are bound one
  by one, as the merge engine binds them: a run compiled on its own would
  compute with XLA's algebra (``a + 0.0`` folded to ``a``, so the sign of a
  zero, and of ``1 / 0``, flips) and compile again at every call."""
  def fn(p, x):
    for i, c in enumerate((0.0, -0.0)):
      h = x @ p[f"w{i}"]
      x = x + jnp.tanh(1.0 / (jnp.sin(h) * 0.0 + c)) + jnp.sin(h)
    return x

  params = {f"w{i}": jax.random.normal(jax.random.key(i), (4, 4))
            for i in range(2)}
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets=r"w\d"),
                         jax.random.key(9))
  x = jax.random.normal(jax.random.key(5), (3, 4))
  got = lj.wrap(fn, "factored")(base, randomize(delta), x)
  want = lj.wrap(fn, "merge")(base, randomize(delta), x)
  assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_scale_multiplies_the_factor_not_the_activations(recompute):
  """A kernel projected on its own computes ``scale * (x @ a)`` as ``x @
  (scale * a)``: the multiply is on the (K, r) factor, not on the (M, r)
  product (one fewer pass over it, forward and backward). Outputs and
  gradients equal the float64 math and the merge engine, with scales that
  are not powers of two and differ per kernel (siblings q and v, rank 8,
  share one product; o, rank 4, reads a cumulative sum, which no region
  recomputes)."""
  m, k, n = 30, 40, 56
  keys = jax.random.split(jax.random.key(3), 9)
  w = {"q": jax.random.normal(keys[0], (k, n)) / 8,
       "v": jax.random.normal(keys[1], (k, n)) / 8,
       "o": jax.random.normal(keys[2], (n, k)) / 8}
  x = jax.random.normal(keys[3], (m, k))
  g = jax.random.normal(keys[4], (m, k))

  def fn(p, x):
    h = jnp.tanh(x) * 1.5
    return jnp.cumsum((h @ p["q"]) * (h @ p["v"]), axis=0) @ p["o"]

  scales = {"q": 0.37, "v": 1.9, "o": 0.61}
  ranks = {"q": 8, "v": 8, "o": 4}
  delta = {nm: lj.LoraDelta(
      jax.random.normal(keys[5 + i], (w[nm].shape[0], ranks[nm])) / 9,
      jax.random.normal(keys[8 - i], (ranks[nm], w[nm].shape[1])) / 5,
      scale=scales[nm]) for i, nm in enumerate(w)}
  loss = lambda d, x: jnp.sum(lj.wrap(fn, "factored", strict=True,
                                      recompute=recompute)(w, d, x) * g)
  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(delta, x)
  # o's product x @ a is (m, 4); no multiply makes one
  assert not re.search(rf"stablehlo.multiply .*tensor<{m}x4xf32>",
                       lowered.as_text())
  value, (gd, gx) = lowered.compile()(delta, x)
  # the value by hand in float64; the gradients against the merge engine
  f64 = lambda v: np.asarray(v, np.float64)
  weights = {nm: f64(w[nm]) + scales[nm] * f64(delta[nm].a) @ f64(delta[nm].b)
             for nm in w}
  h = np.tanh(f64(x)) * 1.5
  want = np.sum(np.cumsum((h @ weights["q"]) * (h @ weights["v"]), axis=0)
                @ weights["o"] * f64(g))
  assert_close(value, want, rtol=1e-5, atol=1e-3)
  merged = lambda d, x: jnp.sum(lj.wrap(fn, "merge")(w, d, x) * g)
  wd, wx = jax.jit(jax.grad(merged, argnums=(0, 1)))(delta, x)
  assert_close(gx, wx, rtol=1e-4, atol=1e-5)
  for nm in delta:
    assert_close(gd[nm].a, wd[nm].a, rtol=1e-4, atol=1e-5)
    assert_close(gd[nm].b, wd[nm].b, rtol=1e-4, atol=1e-5)


def test_scale_folds_in_the_compute_dtype_or_wider():
  """Factors narrower than the activations (``LoraConfig(dtype=bf16)`` or
  float16 on a float32 model): the scale is not rounded to the factor's
  dtype before it multiplies (16 / 6 in bf16 is 0.4% low, the same error on
  every element), nor does a scale past float16's range overflow there.
  The low-rank branch equals the float64 math to float32 rounding."""
  m, k, n = 6, 16, 12
  keys = jax.random.split(jax.random.key(4), 4)
  w = {"w": jax.random.normal(keys[0], (k, n))}
  x = jax.random.normal(keys[1], (m, k))
  fn = lambda p, x: x @ p["w"]
  f64 = lambda v: np.asarray(jnp.asarray(v, jnp.float32), np.float64)
  for dtype, scale in ((jnp.bfloat16, 16 / 6), (jnp.float16, 1e5)):
    d = lj.LoraDelta((jax.random.normal(keys[2], (k, 4)) / 1e3).astype(dtype),
                     jax.random.normal(keys[3], (4, n)).astype(dtype),
                     scale=scale)
    got = lj.wrap(fn, "factored", strict=True)(w, {"w": d}, x)
    want = f64(x) @ (f64(w["w"]) + scale * f64(d.a) @ f64(d.b))
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_one_hot_keeps_x_at_a_one_shared_matmul():
  """``rows="one-hot"`` runs each row on all the stack's factors with a
  per-row, per-rank scale vector: the scale multiplies each row's (M, n R)
  product, never the shared factor (which would make a (rows, K, n R)
  factor per row and batch ``x @ a`` over the rows)."""
  from lora_jax._src.wrap import wrap_rows
  rows, m, k, n = 3, 5, 16, 12
  keys = jax.random.split(jax.random.key(6), 3)
  w = {"w": jax.random.normal(keys[0], (k, n))}
  ds = [randomize(lj.split(w, lj.LoraConfig(rank=2, alpha=alpha, targets="w"),
                           jax.random.key(i))[1], seed=i)
        for i, alpha in enumerate((3.0, 7.0))]
  stacked = lj.stack(ds)
  ids = jnp.array([1, -1, 0])
  x = jax.random.normal(keys[1], (rows, m, k))
  fn = lambda p, x: x @ p["w"]
  run = jax.jit(wrap_rows(fn, "factored", rows="one-hot", strict=True))
  lowered = run.lower(w, stacked, x, adapter_ids=ids)
  assert not re.search(rf"tensor<{rows}x{k}x4xf32>", lowered.as_text())
  got = lowered.compile()(w, stacked, x, adapter_ids=ids)
  f64 = lambda v: np.asarray(v, np.float64)
  for i, j in enumerate(ids.tolist()):
    want = f64(x[i]) @ f64(w["w"])
    if j >= 0:
      d = ds[j]["w"]
      want = want + d.scale * f64(x[i]) @ f64(d.a) @ f64(d.b)
    assert_close(got[i], want, rtol=1e-5, atol=1e-5)
