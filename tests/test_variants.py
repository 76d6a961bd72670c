"""Variants (rsLoRA, dropout, DoRA, PiSSA/OLoRA, per-leaf rank and alpha,
mixed precision, extra trainables) against formulas computed in numpy."""

import math

from cases import CASES
from helpers import numpy_delta_weight
from helpers import randomize
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

LAYERS = ["dense", "attention", "conv2d"]  # Dense, DenseGeneral, Conv layouts


def _close(x, y, rtol=1e-5):
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=rtol,
                               atol=rtol * max(1.0, float(np.abs(b).max())))


def _split(name, **kw):
  case = CASES[name]
  cfg = lj.LoraConfig(rank=2, alpha=3.0, targets=case.targets, **kw)
  base, delta = lj.split(case.params, cfg, jax.random.key(1), apply_fn=case.fn,
                         example_args=case.args)
  return case, base, delta


def _loss(fn, base, args, **kw):
  return lambda d: sum(jnp.sum(jnp.sin(o)) for o in
                       jax.tree.leaves(fn(base, d, *args, **kw)))


# ---- rsLoRA ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["merge", "factored"])
def test_rslora_scale_in_both_engines(mode):
  w = jax.random.normal(jax.random.key(0), (8, 6))
  cfg = lj.LoraConfig(rank=4, alpha=6.0, targets="w", rslora=True)
  base, delta = lj.split({"w": w}, cfg, jax.random.key(1))
  delta = randomize(delta)
  d = delta["w"]
  assert d.scale == 6.0 / 2.0
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 8)), np.float64)
  want = x @ (np.asarray(w, np.float64) + 3.0 * np.asarray(d.a, np.float64)
              @ np.asarray(d.b, np.float64))
  got = lj.wrap(lambda p, x: x @ p["w"], mode)(base, delta, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- dropout -----------------------------------------------------------------

def test_dropout_matches_formula_and_is_off_without_key():
  w = jax.random.normal(jax.random.key(0), (8, 6))
  cfg = lj.LoraConfig(rank=2, alpha=2.0, targets="w", dropout=0.5)
  base, delta = lj.split({"w": w}, cfg, jax.random.key(1))
  delta = randomize(delta)
  d = delta["w"]
  fn = lambda p, x: x @ p["w"]
  x = jax.random.normal(jax.random.key(2), (5, 8))
  key = jax.random.key(7)
  got = lj.wrap(fn, "factored")(base, delta, x, lora_rng=key)
  # the engine's first dropout draws from fold_in(key, 1)
  keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, x.shape)
  xd = np.where(keep, 2.0 * np.asarray(x, np.float64), 0.0)
  w64, a, b = (np.asarray(v, np.float64) for v in (w, d.a, d.b))
  want = np.asarray(x, np.float64) @ w64 + d.scale * (xd @ a) @ b
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert 0.3 < float(keep.mean()) < 0.7
  # no key: deterministic and equal to the merged model (inference)
  no_key = lj.wrap(fn, "factored")(base, delta, x)
  np.testing.assert_allclose(no_key, x @ lj.merge(base, delta)["w"], rtol=1e-5,
                             atol=1e-5)
  # unbiased: the mean over many keys approaches the no-dropout output
  many = jax.vmap(lambda k: lj.wrap(fn, "factored")(base, delta, x, lora_rng=k))(
      jax.random.split(jax.random.key(3), 4000))
  lora_part = np.asarray(no_key) - np.asarray(x) @ np.asarray(w)
  err = np.abs(np.asarray(many.mean(0)) - np.asarray(no_key)).max()
  assert err < 0.1 * np.abs(lora_part).max()


def test_dropout_in_merge_engine_refuses():
  case, base, delta = _split("dense", dropout=0.1)
  with pytest.raises(ValueError, match="cannot apply LoRA dropout"):
    lj.wrap(case.fn, "merge")(base, delta, *case.args, lora_rng=jax.random.key(0))
  # without a key it is plain (deterministic) LoRA
  _close(lj.wrap(case.fn, "merge")(base, delta, *case.args),
         case.fn(case.params, *case.args))


@pytest.mark.parametrize("name", LAYERS + ["scan_remat"])
def test_dropout_gradients_flow_and_differ_by_key(name):
  case, base, delta = _split(name, dropout=0.3)
  delta = randomize(delta)
  f = lj.wrap(case.fn, "factored", strict=True)
  g1 = jax.grad(_loss(f, base, case.args, lora_rng=jax.random.key(1)))(delta)
  g2 = jax.grad(_loss(f, base, case.args, lora_rng=jax.random.key(2)))(delta)
  g0 = jax.grad(_loss(f, base, case.args))(delta)
  gm = jax.grad(_loss(lj.wrap(case.fn, "merge"), base, case.args))(delta)
  _close(g0, gm)  # no key: same as merge
  a1, a2 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g1, g2))
  assert not np.allclose(a1, a2)


# ---- DoRA --------------------------------------------------------------------

def _numpy_dora(w0, d: lj.LoraDelta):
  """m * V / ||V|| with V = W0 + s a b, norm over the input axes."""
  v = np.asarray(w0, np.float64) + numpy_delta_weight(d)
  norm = np.sqrt(np.sum(v * v, axis=d.layout.inputs, keepdims=True))
  mag = np.asarray(d.magnitude, np.float64)
  # magnitude is laid out (*batch, *out); put it on the kernel's axes
  axes = d.layout.batch + d.layout.outputs
  mag = np.transpose(mag, np.argsort(axes))
  shape = [1] * v.ndim
  for i, ax in enumerate(sorted(axes)):
    shape[ax] = mag.shape[i]
  return mag.reshape(shape) * v / norm


@pytest.mark.parametrize("name", LAYERS)
def test_dora_init_merge_and_engines(name):
  case, base, delta = _split(name, dora=True)
  flat = dict(lj.leaves_with_paths(base))
  for path, d in lj.adapters(delta).items():
    w0 = np.asarray(flat[path], np.float64)
    want = np.sqrt(np.sum(w0 ** 2, axis=d.layout.inputs))
    got = np.asarray(d.magnitude)
    axes = d.layout.batch + d.layout.outputs
    np.testing.assert_allclose(np.transpose(got, np.argsort(axes)), want,
                               rtol=1e-5)
  # at init the adapted model is the base model
  _close(lj.wrap(case.fn, "factored")(base, delta, *case.args),
         case.fn(case.params, *case.args))
  delta = randomize(delta)
  delta = jax.tree.map(lambda d: d.replace(magnitude=d.magnitude * 1.3)
                       if isinstance(d, lj.LoraDelta) else d, delta,
                       is_leaf=lambda x: isinstance(x, lj.LoraDelta))
  merged = lj.merge(base, delta)
  for path, d in lj.adapters(delta).items():
    np.testing.assert_allclose(np.asarray(dict(lj.leaves_with_paths(merged))[path]),
                               _numpy_dora(flat[path], d), rtol=1e-5, atol=1e-6)
  out_f = lj.wrap(case.fn, "factored", strict=True)(base, delta, *case.args)
  out_m = lj.wrap(case.fn, "merge")(base, delta, *case.args)
  _close(out_f, out_m)
  g_f = jax.grad(_loss(lj.wrap(case.fn, "factored", strict=True), base, case.args))(delta)
  g_m = jax.grad(_loss(lj.wrap(case.fn, "merge"), base, case.args))(delta)
  _close(g_f, g_m)
  # merge -> unmerge round trip (DoRA needs the norms taken before merging)
  norms = lj.dora_norms(base, delta)
  with pytest.raises(ValueError, match="DoRA adapter; undoing it needs the norms"):
    lj.unmerge(merged, delta)
  _close(lj.unmerge(merged, delta, norms), base, rtol=1e-5)


def test_dora_gradient_treats_norm_as_constant():
  w0 = np.asarray(jax.random.normal(jax.random.key(0), (5, 4)), np.float64)
  cfg = lj.LoraConfig(rank=2, alpha=2.0, targets="w", dora=True)
  base, delta = lj.split({"w": jnp.asarray(w0, jnp.float32)}, cfg, jax.random.key(1))
  delta = randomize(delta)
  d = delta["w"]
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5)), np.float64)
  c = np.asarray(jax.random.normal(jax.random.key(3), (3, 4)), np.float64)
  a, b, m, s = (np.asarray(d.a, np.float64), np.asarray(d.b, np.float64),
                np.asarray(d.magnitude, np.float64), d.scale)
  v = w0 + s * a @ b
  n = np.linalg.norm(v, axis=0)
  g_w = x.T @ c                       # dL/dW' for L = sum(c * (x @ W'))
  want_m = np.sum(g_w * v / n, axis=0)
  g_v = g_w * m / n                   # the norm is held constant
  want_a, want_b = s * g_v @ b.T, s * a.T @ g_v
  for mode in ("merge", "factored"):
    loss = lambda d, mode=mode: jnp.sum(jnp.asarray(c, jnp.float32) * lj.wrap(
        lambda p, x: x @ p["w"], mode)(base, d, jnp.asarray(x, jnp.float32)))
    g = jax.grad(loss)(delta)["w"]
    np.testing.assert_allclose(g.magnitude, want_m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.a, want_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.b, want_b, rtol=1e-4, atol=1e-5)


def test_dora_checkpoint_roundtrip(tmp_path):
  case, base, delta = _split("attention", dora=True)
  loaded = lj.load(lj.save(tmp_path / "a", delta))
  for p, d in lj.adapters(delta).items():
    np.testing.assert_array_equal(lj.adapters(loaded)[p].magnitude, d.magnitude)


# ---- PiSSA / OLoRA -------------------------------------------------------------

def _matrix(k=12, n=9, seed=0):
  u = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))[0]
  v = np.linalg.qr(np.random.default_rng(seed + 1).normal(size=(n, n)))[0]
  s = 2.0 ** -np.arange(min(k, n))  # decaying spectrum
  return (u[:, :len(s)] * s) @ v[:, :len(s)].T


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_principal_inits_reconstruct_and_span(init):
  w = _matrix()
  cfg = lj.LoraConfig(rank=3, alpha=6.0, targets="w", init=init)
  base, delta = lj.split({"w": jnp.asarray(w, jnp.float32)}, cfg, jax.random.key(0))
  d = delta["w"]
  lowrank = numpy_delta_weight(d)
  np.testing.assert_allclose(np.asarray(base["w"]) + lowrank, w, atol=2e-6)
  np.testing.assert_allclose(lj.merge(base, delta)["w"], w, atol=2e-6)
  if init.startswith("pissa"):
    u, s, vt = np.linalg.svd(w)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(lowrank, best, atol=1e-5)
  else:  # OLoRA: QR of PEFT's (out, in) weight
    q, r = np.linalg.qr(w.T)
    np.testing.assert_allclose(np.abs(np.asarray(d.b)), np.abs(q[:, :3].T), atol=1e-5)
    np.testing.assert_allclose(np.abs(np.asarray(d.a)), np.abs(r[:3].T), atol=1e-5)


def test_pissa_on_stacked_and_attention_kernels():
  case, base, delta = _split("attention", init="pissa")
  _close(lj.merge(base, delta), case.params, rtol=1e-5)
  case, base, delta = _split("scan_remat", init="pissa")
  _close(lj.merge(base, delta), case.params, rtol=1e-5)
  _close(lj.wrap(case.fn, "factored")(base, delta, *case.args),
         case.fn(case.params, *case.args), rtol=1e-4)


def test_pissa_converts_to_plain_lora():
  case, base, d0 = _split("dense", init="pissa")
  d1 = randomize(d0, seed=4)
  plain = lj.to_plain_lora(d0, d1)
  assert plain["kernel"].rank == 4
  _close(lj.merge(case.params, plain), lj.merge(base, d1), rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_adapter_refuses_the_original_weights(init, tmp_path):
  case, base, d0 = _split("dense", init=init)
  d1 = randomize(d0, seed=4)
  mark = d1["kernel"].residual_of
  assert mark.init == init
  np.testing.assert_allclose(mark.residual_norm,
                             np.linalg.norm(np.asarray(base["kernel"])), rtol=1e-6)
  np.testing.assert_allclose(mark.original_norm,
                             np.linalg.norm(np.asarray(case.params["kernel"])),
                             rtol=1e-6)
  # the gradient has the same tree structure (and static metadata) as the delta
  g = jax.grad(_loss(lj.wrap(case.fn, "merge"), base, case.args))(d1)
  assert jax.tree.structure(g) == jax.tree.structure(d1)
  message = (rf"The adapter at 'kernel' was made with init='{init}': it belongs "
             rf"with the residual base that lora_jax.split returned .* Use the "
             rf"residual base, or convert the adapter with "
             rf"lora_jax.to_plain_lora\(initial_delta, delta\)")
  loaded = lj.load(lj.save(tmp_path / "a", d1))
  for delta in (d1, loaded):  # the mark survives a checkpoint
    with pytest.raises(ValueError, match=message):
      lj.merge(case.params, delta)
    for mode in ("merge", "factored"):
      with pytest.raises(ValueError, match=message):
        lj.wrap(case.fn, mode)(case.params, delta, *case.args)
    _close(lj.merge(base, delta), lj.merge(base, d1))  # the residual is fine
  # a residual cast to bfloat16 is still recognised as the residual
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  assert lj.merge(bf16, d1)["kernel"].dtype == jnp.bfloat16
  # converted for the original weights, no mark and no error
  plain = lj.to_plain_lora(d0, d1)
  assert plain["kernel"].residual_of is None
  _close(lj.merge(case.params, plain), lj.merge(base, d1), rtol=1e-5)
  # unmerge takes merged weights, which are neither: not checked
  _close(lj.unmerge(lj.merge(base, d1), d1), base, rtol=1e-5)
  # under jit the base is abstract: nothing to check (documented)
  wrong = jax.jit(lj.merge)(case.params, d1)["kernel"]
  _close(wrong, lj.merge(base, d1)["kernel"] + (case.params["kernel"] - base["kernel"]),
         rtol=1e-5)


def test_plain_inits_have_no_mark():
  _, _, delta = _split("dense")
  assert delta["kernel"].residual_of is None
  assert "init=" not in repr(delta["kernel"])


# ---- per-leaf rank and alpha ---------------------------------------------------

def test_rank_and_alpha_patterns():
  case = CASES["attention"]
  cfg = lj.LoraConfig(rank=2, alpha=4.0, targets=case.targets,
                      rank_pattern={r"(query|value)/kernel": 4},
                      alpha_pattern={r"value/kernel": 16.0, r".*": 8.0})
  base, delta = lj.split(case.params, cfg, jax.random.key(0), apply_fn=case.fn,
                         example_args=case.args)
  got = {p: (d.rank, d.scale) for p, d in lj.adapters(delta).items()}
  assert got == {"query/kernel": (4, 2.0), "value/kernel": (4, 4.0),
                 "key/kernel": (2, 4.0), "out/kernel": (2, 4.0)}
  delta = randomize(delta)
  _close(lj.wrap(case.fn, "factored")(base, delta, *case.args),
         lj.wrap(case.fn, "merge")(base, delta, *case.args))
  with pytest.raises(ValueError, match=r"rank_pattern\['q'\] must be int >= 1"):
    lj.LoraConfig(rank_pattern={"q": 0})


# ---- mixed precision -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["merge", "factored"])
def test_bf16_base_f32_factors_against_float64(mode):
  k = jax.random.split(jax.random.key(0), 3)
  w = jax.random.normal(k[0], (64, 32)).astype(jnp.bfloat16)
  x = jax.random.normal(k[1], (16, 64)).astype(jnp.bfloat16)
  base, delta = lj.split({"w": w}, lj.LoraConfig(rank=4, targets="w"), k[2])
  delta = randomize(delta)
  d = delta["w"]
  assert d.a.dtype == jnp.float32 and d.b.dtype == jnp.float32
  fn = lambda p, x: jnp.dot(x, p["w"], preferred_element_type=jnp.float32)
  got = np.asarray(lj.wrap(fn, mode)(base, delta, x), np.float64)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  exact = x64 @ (w64 + numpy_delta_weight(d))
  tol = 2 ** -8 * np.abs(x64) @ np.abs(w64 + numpy_delta_weight(d))  # bf16 ulp
  if mode == "factored":  # base in bf16 (f32 accumulate), LoRA branch in f32
    tol = 1e-5 * np.abs(exact).max() + 1e-6
    exact = x64 @ w64 + x64 @ numpy_delta_weight(d)
  assert np.all(np.abs(got - exact) <= tol + 1e-5)
  merged = lj.merge(base, delta)["w"]
  assert merged.dtype == jnp.bfloat16  # rounded once into the base dtype
  np.testing.assert_array_equal(
      np.asarray(merged, np.float32),
      np.asarray(jnp.asarray(w64 + numpy_delta_weight(d), jnp.float32)
                 .astype(jnp.bfloat16), np.float32))


# ---- extra trainables ----------------------------------------------------------

def test_delta_only_loop_trains_extras_and_saves_them(tmp_path):
  case, base, delta = _split("nnx_linear")
  extras = lj.trainable_leaves(base, r".*/bias")
  assert sorted(extras) == ["fc1/bias", "fc2/bias"]
  apply = lj.wrap(case.fn)
  x = case.args[0]
  tx = optax.adam(1e-2)
  state = tx.init((delta, extras))
  loss = lambda t: jnp.mean((apply(lj.with_leaves(base, t[1]), t[0], x) - 1) ** 2)
  params = (delta, extras)
  first = float(loss(params))
  for _ in range(5):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  assert float(loss(params)) < first
  delta, extras = params
  assert all(np.any(np.asarray(v)) for v in extras.values())  # biases moved
  path = lj.save(tmp_path / "a", delta, extras=extras)
  restored = lj.load_extras(path)
  for p in extras:
    np.testing.assert_array_equal(restored[p], extras[p])
  y = apply(lj.with_leaves(base, restored), lj.load(path), x)
  np.testing.assert_allclose(y, apply(lj.with_leaves(base, extras), delta, x), rtol=1e-6)
  with pytest.raises(ValueError, match="'fc1/bias' has shape"):
    lj.with_leaves(base, {"fc1/bias": jnp.zeros(3)})


@pytest.mark.parametrize("name", LAYERS)
def test_rslora_on_every_layout(name):
  case, base, delta = _split(name, rslora=True)
  delta = randomize(delta)
  flat = dict(lj.leaves_with_paths(base))
  merged = dict(lj.leaves_with_paths(lj.merge(base, delta)))
  for path, d in lj.adapters(delta).items():
    assert d.scale == 3.0 / math.sqrt(2)
    np.testing.assert_allclose(
        merged[path], np.asarray(flat[path], np.float64) + numpy_delta_weight(d),
        rtol=1e-5, atol=1e-6)
  _close(lj.wrap(case.fn, "factored", strict=True)(base, delta, *case.args),
         lj.wrap(case.fn, "merge")(base, delta, *case.args))


@pytest.mark.parametrize("name", LAYERS)
def test_mixed_precision_on_every_layout(name):
  case = CASES[name]
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), case.params)
  cfg = lj.LoraConfig(rank=2, alpha=3.0, targets=case.targets)
  base, delta = lj.split(params16, cfg, jax.random.key(1), apply_fn=case.fn,
                         example_args=case.args)
  delta = randomize(delta)
  assert all(d.a.dtype == jnp.float32 for d in lj.adapters(delta).values())
  merged = dict(lj.leaves_with_paths(lj.merge(base, delta)))
  flat = dict(lj.leaves_with_paths(base))
  for path, d in lj.adapters(delta).items():  # rounded once from float64
    want = np.asarray(flat[path], np.float64) + numpy_delta_weight(d)
    np.testing.assert_array_equal(
        np.asarray(merged[path], np.float32),
        np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float32))
  # both engines agree to bf16 precision on the bf16 model
  x16 = [a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a
         for a in case.args]
  out_f = lj.wrap(case.fn, "factored", strict=True)(base, delta, *x16)
  out_m = lj.wrap(case.fn, "merge")(base, delta, *x16)
  _close(jax.tree.map(lambda o: o.astype(jnp.float32), out_f),
         jax.tree.map(lambda o: o.astype(jnp.float32), out_m), rtol=3e-2)
