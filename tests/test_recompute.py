"""Fewer saved activations (``lj.wrap(..., recompute=True)``, the default):
an adapter's input that is elementwise maths on kept values (GELU of the
previous matmul, LayerNorm's scale and shift) is recomputed in the backward
pass instead of kept. Same numbers, fewer and smaller residuals, less compiled
temp memory; forward mode as documented."""

import collections
import contextlib
import io
import re

from helpers import randomize
import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

D, MLP, T = 32, 128, 64


def _block(p, x):
  """LayerNorm -> q, k, v (siblings) -> o; LayerNorm -> fc1 -> GELU -> fc2."""
  def ln(x, s, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + 1e-6) * s + b
  h = ln(x, p["ln1_s"], p["ln1_b"])
  q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
  att = jax.nn.softmax(q @ k.T / np.sqrt(D), axis=-1)
  x = x + (att @ v) @ p["o"]
  h = ln(x, p["ln2_s"], p["ln2_b"])
  return x + jax.nn.gelu(h @ p["fc1"] + p["fc1_b"]) @ p["fc2"]


def _case(swiglu=False):
  keys = iter(jax.random.split(jax.random.key(0), 12))
  w = lambda *s: jax.random.normal(next(keys), s) / np.sqrt(s[0])
  params = {"q": w(D, D), "k": w(D, D), "v": w(D, D), "o": w(D, D),
            "fc1": w(D, MLP), "fc1_b": jnp.zeros(MLP), "fc2": w(MLP, D),
            "ln1_s": jnp.ones(D), "ln1_b": jnp.zeros(D),
            "ln2_s": jnp.ones(D), "ln2_b": jnp.zeros(D)}
  fn = _block
  if swiglu:
    params["up"] = w(D, MLP)

    def fn(p, x):
      h = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
      return jax.nn.silu(h @ p["fc1"]) * (h @ p["up"]) @ p["fc2"]
  cfg = lj.LoraConfig(rank=4, alpha=8.0, targets=r"q|k|v|o|fc1|fc2|up")
  base, delta = lj.split(params, cfg, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (T, D))
  return fn, base, randomize(delta, scale=0.3), x


def _loss(fn, base, x, **kw):
  return lambda d: jnp.sum(jnp.tanh(lj.wrap(fn, "factored", **kw)(base, d, x)))


@pytest.mark.parametrize("swiglu", [False, True])
def test_recomputing_gives_the_same_gradients(swiglu):
  fn, base, delta, x = _case(swiglu)
  g_on = jax.jit(jax.grad(_loss(fn, base, x)))(delta)
  g_off = jax.jit(jax.grad(_loss(fn, base, x, recompute=False)))(delta)
  g_merge = jax.grad(lambda d: jnp.sum(jnp.tanh(
      lj.wrap(fn, "merge")(base, d, x))))(delta)
  for a, b, c in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off),
                     jax.tree.leaves(g_merge)):
    scale = float(jnp.abs(b).max())  # float32 sums, in another order
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * scale)


def _residual_shapes(fn, base, delta, x, **kw) -> collections.Counter:
  """How many residuals of each shape the backward pass keeps."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):  # JAX's public view of residuals
    print_saved_residuals(_loss(fn, base, x, **kw), delta)
  return collections.Counter(
      tuple(int(n) for n in m.split(",") if n)
      for m in re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M))


def test_gelu_input_and_layernorm_output_are_not_kept():
  fn, base, delta, x = _case()
  on = _residual_shapes(fn, base, delta, x)
  off = _residual_shapes(fn, base, delta, x, recompute=False)
  # Without: fc1's output, GELU's intermediates (four on jax >= 0.7, three
  # before), and fc2's input (GELU's output, kept by fc2's adapter as (T, 1,
  # MLP)). With: fc1's output only; the rest is recomputed from it.
  assert (on[(T, MLP)], on[(T, 1, MLP)]) == (1, 0), on
  assert off[(T, MLP)] >= 4 and off[(T, 1, MLP)] == 1, off
  # Adapters' inputs kept as (T, 1, D): without, the LayerNorm outputs read
  # by q/k/v and by fc1, and o's input (attention's output); with, o's
  # input only (LayerNorm's output is recomputed from what LayerNorm's own
  # backward pass keeps).
  assert (on[(T, 1, D)], off[(T, 1, D)]) == (1, 3), (on, off)


@pytest.mark.parametrize("swiglu", [False, True])
def test_backward_pass_reuses_the_low_rank_product(swiglu):
  """A recomputed region keeps its members' x @ a (r columns) and its
  backward pass reuses it: the gradient multiplies no more matrices than
  with recompute=False (x itself, elementwise maths, is what it recomputes).
  Before, each region multiplied x @ a again."""
  fn, base, delta, x = _case(swiglu)

  def dots(**kw):
    lowered = jax.jit(jax.grad(_loss(fn, base, x, **kw))).lower(delta)
    return lowered.as_text().count("stablehlo.dot_general")
  assert dots() == dots(recompute=False), (dots(), dots(recompute=False))


def test_compiled_temp_memory_shrinks():
  """Four blocks: the saved activations decide the step's temp memory."""
  layers = 4
  blocks = [_case()[1:3] for _ in range(layers)]
  base = {f"l{i}": b for i, (b, _) in enumerate(blocks)}
  delta = {f"l{i}": d for i, (_, d) in enumerate(blocks)}
  x = _case()[3]

  def fn(p, x):
    for i in range(layers):
      x = _block(p[f"l{i}"], x)
    return x
  temp = {}
  for on in (True, False):
    step = jax.jit(jax.grad(_loss(fn, base, x, recompute=on)))
    compiled = step.lower(delta).compile()
    mem = compiled.memory_analysis()
    if mem is None:
      pytest.skip("this backend reports no compiled memory")
    temp[on] = mem.temp_size_in_bytes
    if on:
      # Each of the 3 regions per block computes its data-free zero once
      # (ordering._anchor_elements). Read from one element, XLA copied it
      # into every fusion reading a recomputed region's root: 113 copies
      # here, 15% of the compiled program's lines.
      text = compiled.as_text()
      ties = text.count("popcnt(")
      assert 0 < ties <= 3 * layers, ties
      # The zero is clamped and cast inside its reduction, so the fusions
      # reading a root copy only a broadcast and a subtract of it: a clamp
      # or cast of the reduced scalar was copied into each (74 copies of
      # each on W1).
      scalar_ops = re.findall(r"= [a-z0-9]+\[\] (minimum|convert)\(", text)
      assert len(scalar_ops) <= ties, scalar_ops
  # GELU's output and intermediates per block, less what else is live at
  # the peak: measured 1.94 (T, MLP) float32 buffers fewer per block on
  # jax 0.10, 1.23 on jax 0.6.2
  assert temp[True] <= temp[False] - layers * T * MLP * 4, temp


def test_forward_mode():
  fn, base, delta, x = _case()
  f = lambda **kw: lambda d: lj.wrap(fn, "factored", **kw)(base, d, x)
  ref = lambda d: lj.wrap(fn, "merge")(base, d, x)
  t = jax.tree.map(jnp.ones_like, delta)
  want = jax.jvp(ref, (delta,), (t,))[1]
  # eager jvp: falls back to no recomputation by itself
  np.testing.assert_allclose(jax.jvp(f(), (delta,), (t,))[1], want,
                             rtol=1e-4, atol=1e-4)
  # forward mode under jit: recompute=False (documented); with it on, JAX's
  # own custom_vjp error
  jitted = lambda **kw: jax.jit(lambda d: jax.jvp(f(**kw), (d,), (t,))[1])
  np.testing.assert_allclose(jitted(recompute=False)(delta), want,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(TypeError, match="forward-mode"):
    jitted()(delta)
  # forward over reverse (a Hessian-vector product) under jit works either
  # way: it differentiates the custom_vjp's rules, which are plain code
  loss = lambda g: lambda d: jnp.sum(jnp.tanh(g(d)))
  hvp = lambda g: jax.jit(lambda d: jax.jvp(jax.grad(loss(g)), (d,), (t,))[1])
  want = hvp(ref)(delta)
  for got in (hvp(f(recompute=False))(delta), hvp(f())(delta)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      # float32 rounding relative to the largest entry (about 300 here): an
      # entry of 0.21 was 3e-4 off on jax 0.6.2 without LLVM's optimisations
      np.testing.assert_allclose(a, b, rtol=1e-3,
                                 atol=1e-4 + 2e-6 * np.abs(b).max())
  # reverse over forward (grad of a jvp) needs recompute=False: with it on,
  # JAX cannot transpose the custom_vjp's linearization (README,
  # Limitations)
  tx = jnp.cos(x)
  rof = lambda mode, **kw: jax.jit(jax.grad(lambda d: jnp.sum(jnp.sin(
      jax.jvp(lambda x: lj.wrap(fn, mode, **kw)(base, d, x), (x,),
              (tx,))[1]))))
  want = rof("merge")(delta)
  got = rof("factored", recompute=False)(delta)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3,
                               atol=1e-4 + 2e-6 * np.abs(b).max())
  with pytest.raises(NotImplementedError, match="custom_lin"):
    rof("factored")(delta)


def test_mixed_adapter_batch_with_recomputed_inputs():
  """A stack on the block, rows mixed: run whole (per-row factors inside the
  recomputed regions) it gives the gradients the vmap-over-rows form gives."""
  from lora_jax._src.wrap import wrap_rows
  fn, base, _, _ = _case()
  deltas = [_case()[2] for _ in range(2)]
  deltas[1] = jax.tree.map(lambda v: 0.5 * v, deltas[1])
  stacked = lj.stack(deltas)
  x = jax.random.normal(jax.random.key(3), (3, T, D))
  ids = jnp.array([1, -1, 0])
  loss = lambda s, rows: jnp.sum(jnp.tanh(wrap_rows(
      _batched(fn), "factored", rows=rows)(base, s, x, adapter_ids=ids)))
  g_whole = jax.jit(jax.grad(loss), static_argnums=1)(stacked, "auto")
  g_vmap = jax.jit(jax.grad(loss), static_argnums=1)(stacked, "gather")
  for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_vmap)):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(b).max()))
  assert float(jnp.abs(jax.tree.leaves(g_whole)[0]).max()) > 0


def _batched(fn):
  """The block over a leading batch axis (rows), as models take a batch."""
  return lambda p, x: jax.vmap(lambda r: fn(p, r))(x)


def test_regions_of_the_same_structure_share_one_backward_pass(monkeypatch):
  """Every layer of a deep model recomputes alike, so their regions share
  one traced backward pass; a region that differs in anything the backward
  pass computes with (a literal such as LayerNorm's eps, an adapter's
  scale) gets its own. Gradients equal the merge engine's either way: a
  region that shared wrongly would use another layer's eps or scale."""
  from lora_jax._src.factored import recompute

  def ln(x, s, b, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + eps) * s + b

  def block(p, x, eps):
    h = ln(x, p["ln1_s"], p["ln1_b"], eps)
    q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
    att = jax.nn.softmax(q @ k.T / np.sqrt(D), axis=-1)
    x = x + (att @ v) @ p["o"]
    h = ln(x, p["ln2_s"], p["ln2_b"], eps)
    return x + jax.nn.gelu(h @ p["fc1"] + p["fc1_b"]) @ p["fc2"]

  eps = (1e-6, 1e-6, 0.5, 1e-6)  # layer 2: another eps in both LayerNorms

  def fn(p, x):
    for i, e in enumerate(eps):
      x = block(p[f"l{i}"], x, e)
    return x

  keys = iter(jax.random.split(jax.random.key(0), 64))
  w = lambda *s: jax.random.normal(next(keys), s) / np.sqrt(s[0])
  layer = lambda: {
      "q": w(D, D), "k": w(D, D), "v": w(D, D), "o": w(D, D),
      "fc1": w(D, MLP), "fc1_b": w(MLP) * 0.1, "fc2": w(MLP, D),
      "ln1_s": 1 + w(D) * 0.1, "ln1_b": w(D) * 0.1,
      "ln2_s": 1 + w(D) * 0.1, "ln2_b": w(D) * 0.1}
  params = {f"l{i}": layer() for i in range(len(eps))}
  cfg = lj.LoraConfig(rank=4, alpha=8.0, targets=r"l\d/(q|k|v|o|fc1|fc2)")
  base, delta = lj.split(params, cfg, jax.random.key(1))
  delta = randomize(delta, scale=0.3)
  # layer 3: q's adapter at twice the scale (static, not an array)
  q3 = delta["l3"]["q"]
  delta["l3"]["q"] = type(q3)(q3.a, q3.b, 2 * q3.scale, q3.layout)
  x = jax.random.normal(jax.random.key(2), (T, D))

  traced = []
  real = recompute._backward
  monkeypatch.setattr(recompute, "_backward", lambda *a: (
      traced.append(1), real(*a))[1])
  g_on = jax.jit(jax.grad(_loss(fn, base, x)))(delta)
  g_merge = jax.grad(lambda d: jnp.sum(jnp.tanh(
      lj.wrap(fn, "merge")(base, d, x))))(delta)
  for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(g_on),
                          jax.tree.leaves(g_merge)):
    scale = float(jnp.abs(c).max())
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # per layer: LayerNorm -> q/k/v, LayerNorm -> fc1, GELU -> fc2. Layers 0
  # and 1 share all three; layer 2 shares GELU's; layer 3 all but q/k/v's
  assert len(traced) == 3 + 2 + 1, len(traced)
