"""The engine zoo: programs shaped like our users' x stresses that a review
found silent failures under.

Programs: a dense GELU MLP (a recompute region), q/k/v siblings behind a
LayerNorm, GQA einsum attention, scan over stacked layers, remat, cond, a
while loop, shard_map. Bases: float32, bfloat16 (the program widens it),
QArray (nf4). Stresses:

* engines agree: factored (with and without recompute) equals merge, for
  outputs and input gradients;
* rows are independent: a NaN or inf in one row's input, or in one row's
  cotangent, changes no other row's output or input gradient, in every mode;
* discovery: ``all-linear`` finds the expected set on bf16 models and through
  a 6-deep scan carry pipeline;
* a bug injected into a rule propagates (it is not reported as a fallback).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools

from helpers import randomize
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src.factored import consumers

B, D, H, KV, HD = 4, 8, 4, 2, 4  # rows, width, heads, kv heads, head dim


def _normal(key, shape, scale=0.4):
  return scale * jax.random.normal(key, shape)


def _keys(n, seed=0):
  return list(jax.random.split(jax.random.key(seed), n))


@dataclasses.dataclass
class Program:
  name: str
  params: dict
  fn: Callable
  targets: str
  x_shape: tuple = (B, 3, D)  # rows first


def dense():
  k = _keys(3)
  params = {"fc1": _normal(k[0], (D, 2 * D)), "fc2": _normal(k[1], (2 * D, D)),
            "head": _normal(k[2], (D, 5))}

  def fn(p, x):
    h = jax.nn.gelu(x @ p["fc1"]) @ p["fc2"]
    return h @ p["head"]
  return Program("dense", params, fn, "fc1|fc2")


def siblings():
  k = _keys(4)
  params = {n: _normal(k[i], (D, D)) for i, n in enumerate("qkvo")}
  params["ln"] = jnp.ones((D,))

  def fn(p, x):
    mu = x.mean(-1, keepdims=True)
    h = (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    h = h * p["ln"]
    q, kk, v = h @ p["q"], h @ p["k"], h @ p["v"]
    return jnp.tanh(q * kk + v) @ p["o"]
  return Program("siblings", params, fn, "q|k|v|o")


def gqa():
  k = _keys(4)
  params = {"q": _normal(k[0], (D, H, HD)), "k": _normal(k[1], (D, KV, HD)),
            "v": _normal(k[2], (D, KV, HD)), "o": _normal(k[3], (H, HD, D))}

  def fn(p, x):
    q = jnp.einsum("btd,dnh->btnh", x, p["q"])
    kk = jnp.einsum("btd,dkh->btkh", x, p["k"])
    v = jnp.einsum("btd,dkh->btkh", x, p["v"])
    q = q.reshape(*q.shape[:2], KV, H // KV, HD)
    s = jnp.einsum("btkgh,bskh->bkgts", q, kk) / np.sqrt(HD)
    t = x.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    a = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s, -1), v)
    return jnp.einsum("btnh,nhd->btd", a.reshape(*a.shape[:2], H, HD), p["o"])
  return Program("gqa", params, fn, "q|k|v|o")


def scanned():
  k = _keys(2)
  params = {"w": _normal(k[0], (3, D, D)), "u": _normal(k[1], (3, D, D))}

  def fn(p, x):
    def layer(h, w):
      return h + jnp.tanh(jax.nn.gelu(h @ w["w"]) @ w["u"]), None
    return jax.lax.scan(layer, x, p)[0]
  return Program("scan", params, fn, "w|u")


def remat():
  k = _keys(2)
  params = {"w": _normal(k[0], (D, D)), "u": _normal(k[1], (D, D))}

  @jax.checkpoint
  def block(p, x):
    return jnp.tanh(x @ p["w"]) @ p["u"]

  def fn(p, x):
    return block(p, x) + x
  return Program("remat", params, fn, "w|u")


def cond():
  k = _keys(2)
  params = {"w": _normal(k[0], (D, D)), "u": _normal(k[1], (D, D)),
            "gate": jnp.ones(())}

  def fn(p, x):
    # the predicate reads a parameter, not the rows
    return jax.lax.cond(p["gate"] > 0,
                        lambda x: jnp.tanh(x @ p["w"]) @ p["u"],
                        lambda x: x @ p["u"], x)
  return Program("cond", params, fn, "w|u")


def while_loop():
  k = _keys(1)
  params = {"w": _normal(k[0], (D, D))}

  def fn(p, x):
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x)
  return Program("while", params, fn, "w")


def sharded():
  k = _keys(2)
  params = {"w": _normal(k[0], (D, D)), "u": _normal(k[1], (D, D))}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))

  def fn(p, x):
    body = lambda p, x: jnp.tanh(x @ p["w"]) @ p["u"]
    return lj_shard_map(body, mesh, (P(), P("d")), P("d"))(p, x)
  return Program("shard_map", params, fn, "w|u")


def lj_shard_map(body, mesh, in_specs, out_specs):
  """shard_map from where this JAX has it."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs)
  from jax.experimental.shard_map import shard_map
  return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


PROGRAMS = [dense, siblings, gqa, scanned, remat, cond, while_loop, sharded]


def _base(prog: Program, kind: str):
  """``(fn, base, delta)`` with the base float32, bf16 or nf4. The program
  computes in float32 (a bf16 base is widened by it)."""
  config = lj.LoraConfig(rank=2, targets=prog.targets)
  base, delta = lj.split(prog.params, config, jax.random.key(1), prog.fn,
                         (_x(prog),))
  delta = randomize(delta)
  if kind == "f32":
    return prog.fn, base, delta
  if kind == "bf16":
    base = jax.tree.map(lambda w: w.astype(jnp.bfloat16), base)
    fn = lambda p, x: prog.fn(jax.tree.map(lambda w: w.astype(jnp.float32), p), x)
    return fn, base, delta
  assert kind == "nf4"
  return prog.fn, lj.quantize(base, "nf4", block_size=2, delta=delta), delta


ENGINES = {
    "merge": dict(mode="merge"),
    "factored": dict(mode="factored", strict=True),
    "factored[recompute=False]": dict(mode="factored", strict=True,
                                      recompute=False),
}
# Every program on a float32 base; the narrow bases on the programs whose
# kernels they change the rules for (dense matmuls, einsums, scan slices).
CASES = ([(p, "f32") for p in PROGRAMS]
         + [(p, kind) for p in (dense, gqa, scanned) for kind in ("bf16", "nf4")])


def _x(prog):
  return jax.random.normal(jax.random.key(7), prog.x_shape)


def _vjp(g, base, delta, x, ct):
  out, pull = jax.vjp(lambda x: g(base, delta, x), x)
  return out, pull(ct)[0]


# Each case's results, computed once per process, whatever order the tests
# using a case run in.
_RESULTS: dict = {}


@pytest.fixture(scope="module", params=CASES,
                ids=[f"{p.__name__}-{k}" for p, k in CASES])
def case(request):
  if request.param not in _RESULTS:
    _RESULTS[request.param] = _case(*request.param)
  return _RESULTS[request.param]


def _case(make, kind):
  prog = make()
  fn, base, delta = _base(prog, kind)
  x = _x(prog)
  ct = jax.random.normal(jax.random.key(8), jax.eval_shape(
      lambda: prog.fn(prog.params, x)).shape)
  results = {}
  for name, opts in ENGINES.items():
    g = jax.jit(lambda b, d, x, ct, opts=opts: _vjp(lj.wrap(fn, **opts), b, d, x, ct))
    results[name] = (g, jax.device_get(g(base, delta, x, ct)))
  # What the factored engine must equal: the program on merge(base, delta),
  # merged in the program's float32 (merging into a bf16 kernel would round
  # the update to bf16 first).
  wide = jax.tree.map(lambda w: w.astype(jnp.float32)
                      if w.dtype == jnp.bfloat16 else w, base)
  merged = lambda b, d, x: fn(lj.merge(b, d), x)
  # Jitted as the engines are: on a GPU, XLA keeps fused bf16 arithmetic in
  # float32 (excess precision), so an eager reference would differ by bf16
  # rounding there (seen on an H100: 0.03 on dense-bf16 under mode="merge").
  ref = jax.jit(lambda b, d, x, ct: _vjp(merged, b, d, x, ct))
  results["reference"] = jax.device_get(ref(wide, delta, x, ct))
  # mode="merge" is lj.merge itself: into the base's own dtype.
  results["reference[merge]"] = jax.device_get(ref(base, delta, x, ct))
  return base, delta, x, ct, results


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engines_equal_merge(case, engine):
  *_, results = case
  reference = "reference[merge]" if engine == "merge" else "reference"
  (out, dx), (want, want_dx) = results[engine][1], results[reference]
  # float32 rounding: dx sums over siblings' branches in another order than
  # the merged kernel's product (2.9e-5 off at 0.37 seen without LLVM's
  # optimisations, tests/conftest.py)
  np.testing.assert_allclose(out, want, rtol=5e-5, atol=5e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["input", "cotangent"])
def test_rows_are_independent(case, engine, bad, where):
  base, delta, x, ct, results = case
  g, (out, dx) = results[engine]
  if where == "input":
    x = x.at[0].set(bad)
  else:
    ct = ct.at[0].set(bad)
  out2, dx2 = jax.device_get(g(base, delta, x, ct))
  # Every other row: bit for bit what it was.
  np.testing.assert_array_equal(out2[1:], out[1:])
  np.testing.assert_array_equal(dx2[1:], dx[1:])
  if where == "input":
    assert not np.isfinite(out2[0]).all()


# ---- discovery --------------------------------------------------------------

def test_all_linear_on_a_bf16_model():
  k = _keys(3)
  params = {"q": _normal(k[0], (D, H, HD)).astype(jnp.bfloat16),
            "o": _normal(k[1], (H, HD, D)).astype(jnp.bfloat16),
            "head": _normal(k[2], (D, 5)).astype(jnp.bfloat16),
            "norm": jnp.ones((D,), jnp.bfloat16)}

  def fn(p, x):
    h = jnp.einsum("btd,dnh->btnh", x, p["q"])
    h = jnp.einsum("btnh,nhd->btd", jax.nn.relu(h), p["o"]) * p["norm"]
    return h @ p["head"]
  x = jnp.ones((2, 3, D), jnp.bfloat16)
  _, delta = lj.split(params, lj.LoraConfig(rank=2, targets="all-linear"),
                      jax.random.key(0), fn, (x,))
  assert sorted(lj.adapters(delta)) == ["o", "q"]  # head: the output layer


@pytest.mark.parametrize("depth", [1, 5, 6])
def test_all_linear_through_a_deep_scan_carry(depth):
  """The product of ``w`` moves one carry slot per step; only after
  ``depth`` steps does it reach the matmul with ``u``."""
  k = _keys(3)
  params = {"w": _normal(k[0], (D, D)), "u": _normal(k[1], (D, D)),
            "head": _normal(k[2], (D, 3))}

  def fn(p, x):
    def body(c, _):
      return (x @ p["w"], *c[:-1]), None
    c, _ = jax.lax.scan(body, tuple(jnp.zeros_like(x) for _ in range(depth)),
                        None, length=depth + 2)
    return jnp.tanh(c[-1] @ p["u"]) @ p["head"]
  _, delta = lj.split(params, lj.LoraConfig(rank=2, targets="all-linear"),
                      jax.random.key(0), fn, (jnp.ones((2, D)),))
  assert sorted(lj.adapters(delta)) == ["u", "w"]


# ---- a bug in a rule is a bug, not a fallback ---------------------------------

@pytest.mark.parametrize("error", [KeyError, ValueError])
def test_a_bug_in_a_rule_propagates(monkeypatch, error):
  prog = dense()
  fn, base, delta = _base(prog, "f32")

  def broken(*args, **kwargs):
    raise error("injected")
  monkeypatch.setattr(consumers, "lowrank_dot", broken)
  for run in (lambda: lj.wrap(fn, "factored")(base, delta, _x(prog)),
              lambda: lj.explain(fn, base, delta, _x(prog), mode="factored")):
    with pytest.raises(error, match="injected") as info:
      run()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "'dot_general'" in notes and "fc1" in notes, notes



def test_one_rule_table_holds_the_higher_order_primitives():
  """Evaluation dispatches through one table keyed by primitive; scan,
  while, cond, remat, jit, custom_jvp/vjp and shard_map are in it."""
  from lora_jax._src.factored import interpreter
  from lora_jax._src.factored import programs

  @jax.custom_jvp
  def cj(x):
    return x
  cj.defjvp(lambda p, t: (p[0], t[0]))

  @jax.custom_vjp
  def cv(x):
    return x
  cv.defvjp(lambda x: (x, None), lambda _, g: (g,))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  smap = getattr(jax, "shard_map", None) or __import__(
      "jax.experimental.shard_map", fromlist=["shard_map"]).shard_map

  def fn(x):
    x = jax.lax.scan(lambda c, _: (c + 1, None), x, None, length=2)[0]
    x = jax.lax.while_loop(lambda c: c[0, 0] < 0, lambda c: c + 1, x)
    x = jax.lax.cond(x[0, 0] > 0, jnp.sin, jnp.cos, x)
    x = jax.checkpoint(jnp.sin)(jax.jit(jnp.cos)(x))
    x = smap(jnp.sin, mesh=mesh, in_specs=P(), out_specs=P())(cv(cj(x)))
    return x
  eqns = jax.make_jaxpr(fn)(jnp.ones((2, 2))).jaxpr.eqns
  got = {e.primitive.name: interpreter.RULES.get(e.primitive) for e in eqns
         if interpreter.RULES.get(e.primitive) in (
             programs.call, programs.scan, programs.while_, programs.cond,
             programs.remat, programs.shard_map)}
  want = {programs.scan, programs.while_, programs.cond, programs.remat,
          programs.call, programs.shard_map}
  assert set(got.values()) == want, got
  # jit, custom_jvp and custom_vjp: three primitives, all inlined by call
  assert sum(r is programs.call for r in got.values()) == 3, got


def test_a_bug_in_a_higher_order_rule_propagates(monkeypatch):
  prog = scanned()
  fn, base, delta = _base(prog, "f32")
  from lora_jax._src.factored import programs

  def broken(*args, **kwargs):
    raise ValueError("injected")
  monkeypatch.setattr(programs, "_drop_leading", broken)
  with pytest.raises(ValueError, match="injected") as info:
    lj.wrap(fn, "factored")(base, delta, _x(prog))
  notes = "\n".join(getattr(info.value, "__notes__", []))
  assert "'scan'" in notes and "w" in notes, notes


# ---- mixed-adapter batches ----------------------------------------------------

def _stacked(params, targets, n=3, dropout=0.0, fn=None, x=None):
  """``(base, [delta_k], stack)``: ``n`` random adapters on ``targets``."""
  ds = []
  for k in range(n):
    base, d = lj.split(params, lj.LoraConfig(rank=2, targets=targets,
                                             dropout=dropout),
                       jax.random.key(k), *(() if fn is None else (fn, (x,))))
    ds.append(randomize(d, seed=10 + k))
  return base, ds, lj.stack(ds)


def _per_row(fn, base, ds, ids, x, axis=0):
  """The contract: row ``i`` run alone on ``merge(base, ds[ids[i]])``,
  the rows stacked back on the output's row axis ``axis``."""
  rows = []
  for i, k in enumerate(ids):
    p = base if k < 0 else lj.merge(base, ds[k])
    rows.append(fn(p, x[i:i + 1]))
  return jnp.concatenate(rows, axis=axis)


def _wrap_for(whole: bool):
  """``lj.wrap`` running mixed batches whole where it can (as wrap does),
  or always under vmap over rows."""
  from lora_jax._src.wrap import wrap_rows
  return functools.partial(wrap_rows, rows="auto" if whole else "gather")


def _two_sites():
  k = _keys(2)
  params = {"w": _normal(k[0], (D, D)), "u": _normal(k[1], (D, D))}

  @jax.jit
  def helper(w, x):  # one jaxpr, two call sites
    return x @ w

  def fn(p, x):  # x (B, T, D)
    h = jnp.tanh(helper(p["w"], x))                # rows on axis 0
    t = helper(p["w"], jnp.swapaxes(x, 0, 1))      # rows on axis 1
    return h @ p["u"] + jnp.swapaxes(t, 0, 1)
  return params, fn


@pytest.mark.parametrize("whole", [True, False])
def test_a_jaxpr_shared_by_two_call_sites(whole):
  wrap = _wrap_for(whole)
  params, fn = _two_sites()
  base, ds, st = _stacked(params, "w|u")
  x = jax.random.normal(jax.random.key(3), (4, 5, D))
  ids = [0, 2, -1, 1]
  got = jax.jit(wrap(fn, "factored"))(base, st, x, adapter_ids=jnp.array(ids))
  np.testing.assert_allclose(got, _per_row(fn, base, ds, ids, x),
                             rtol=2e-5, atol=2e-5)


def _shared_projections():
  """One jitted helper (one jaxpr) projecting ``gelu(h)`` with three
  kernels, called at two sites: with q, k, v (all adapted: one group of
  three and a recompute region for ``gelu(h)``) and with q, u, v (u is not
  adapted: a group of two, and no region, as ``gelu(h)`` is also read by
  the frozen u)."""
  k = _keys(4)
  params = {n: _normal(k[i], (D, D)) for i, n in enumerate("qkvu")}

  @jax.jit
  def proj(wq, wk, wv, h):
    h = jax.nn.gelu(h)
    return h @ wq, h @ wk, h @ wv

  def fn(p, x):
    a, b, c = proj(p["q"], p["k"], p["v"], x)
    d, e, f = proj(p["q"], p["u"], p["v"], jnp.tanh(x))
    return a * b + c + d * e - f
  return params, fn


def _spy_plans(monkeypatch) -> list:
  """The root plan of each factored call, as the interpreter makes it."""
  from lora_jax._src.factored import plan
  made = []
  real = plan.plan
  monkeypatch.setattr(plan, "plan",
                      lambda *a, **k: made.append(real(*a, **k)) or made[-1])
  return made


@pytest.mark.parametrize("mixed", [False, True])
def test_a_jaxpr_shared_by_two_call_sites_is_planned_at_each(monkeypatch,
                                                             mixed):
  """Sibling groups and recompute regions are planned before evaluation,
  by equation position per call site: the helper's one jaxpr gets a group
  of three with a region at one site and a group of two without at the
  other; single adapters and a mixed batch run whole (per-row factors) alike,
  equal to merge (to each row run alone), and a NaN row stays in its row."""
  params, fn = _shared_projections()
  x = jax.random.normal(jax.random.key(3), (B, 3, D))
  made = _spy_plans(monkeypatch)
  if mixed:
    base, ds, delta = _stacked(params, "q|k|v")
    ids = jnp.array([2, 0, -1, 1])
    g = lambda d, x, mode: lj.wrap(fn, mode, strict=True)(
        base, d, x, adapter_ids=ids)
  else:
    base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="q|k|v"),
                           jax.random.key(1))
    delta = randomize(delta)
    g = lambda d, x, mode: lj.wrap(fn, mode, strict=True)(base, d, x)
  ct = jax.random.normal(jax.random.key(4), (B, 3, D))
  step = jax.jit(lambda d, x, mode: (lambda out, pull: (out, *pull(ct)))(
      *jax.vjp(lambda d, x: g(d, x, mode), d, x)), static_argnums=2)
  out, got_dd, got_dx = step(delta, x, "factored")
  _, want_dd, want_dx = step(delta, x, "merge")
  want = (_per_row(fn, base, ds, list(ids), x) if mixed
          else fn(lj.merge(base, delta), x))
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  # gradients (through the regions' custom_vjp) equal merge's
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got_dd), jax.tree.leaves(want_dd)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # the plan: the two call sites' sub-plans are for one jaxpr, and differ
  (root,) = made
  sites = sorted(root.subs)
  assert len(sites) == 2, root.subs
  (one,), (two,) = (root.subs[i] for i in sites)
  assert one.jaxpr is two.jaxpr
  shape = lambda p: sorted((len(h.members), h.region is not None,
                            h.x_rows) for h in p.heads.values())
  row = 0 if mixed else None
  assert shape(one) == [(3, True, row)], one.heads
  assert shape(two) == [(2, False, row)], two.heads
  assert [k.path for k in one.heads[min(one.heads)].kernels] == ["q", "k", "v"]
  # a NaN row changes no other row (output or input gradient)
  bad_out, _, bad_dx = step(delta, x.at[1].set(jnp.nan), "factored")
  assert np.isnan(bad_out[1]).all()
  for bad, good in ((bad_out, out), (bad_dx, got_dx)):
    np.testing.assert_array_equal(np.delete(bad, 1, 0), np.delete(good, 1, 0))


def test_siblings_widened_next_to_their_matmuls_are_grouped(monkeypatch):
  """Flax layers widen each bf16 kernel right before its matmul (q's cast,
  q's matmul, k's cast, ...): the plan still groups q, k and v (the head
  evaluates the later casts first), with the region recomputing their input;
  outputs and gradients equal the program on the merged float32 kernels."""
  k = _keys(3)
  params = {n: _normal(k[i], (D, D)).astype(jnp.bfloat16)
            for i, n in enumerate("qkv")}

  def fn(p, x):
    h = jnp.tanh(x)
    return sum(h @ p[n].astype(jnp.float32) for n in "qkv")
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="q|k|v"),
                         jax.random.key(1))
  delta = randomize(delta)
  x = _x(dense())
  made = _spy_plans(monkeypatch)
  loss = lambda g: lambda d, x: jnp.sum(jnp.sin(g(d, x)))
  got = jax.jit(jax.value_and_grad(loss(
      lambda d, x: lj.wrap(fn, "factored", strict=True)(base, d, x)), (0, 1)))(
          delta, x)
  wide = jax.tree.map(lambda w: w.astype(jnp.float32), base)
  want = jax.jit(jax.value_and_grad(loss(
      lambda d, x: fn(lj.merge(wide, d), x)), (0, 1)))(delta, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-5)
  (head,) = made[0].heads.values()
  assert [k.path for k in head.kernels] == ["q", "k", "v"]
  assert head.region is not None and len(head.early) == 2, head


def test_a_plan_evaluation_disagrees_with_is_an_error(monkeypatch):
  """The plan is an abstraction of evaluation: if the analysis got a view
  wrong (here a transpose that hands on another kernel), the head's check
  refuses to compute with it, naming the equation and the kernels."""
  from lora_jax._src.factored import plan
  k = _keys(3)
  params = {n: _normal(k[i], (D, D)) for i, n in enumerate("qkv")}
  def fn(p, x):  # kernels stored (out, in)
    ws = [p[n].T for n in "qkv"]
    return sum(x @ w for w in ws)
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="q|k|v"),
                         jax.random.key(1), fn, (_x(dense()),))
  real = plan._view

  def wrong(eqn, ins):
    outs = real(eqn, ins)
    if eqn.primitive.name == "transpose":
      return [dataclasses.replace(o, path=o.path.upper()) for o in outs]
    return outs
  monkeypatch.setattr(plan, "_view", wrong)
  with pytest.raises(AssertionError, match=r"planned with kernel 'Q'.* "
                                           r"evaluates 'q'.*analysis and "
                                           r"evaluation disagree"):
    lj.wrap(fn, "factored")(base, delta, _x(dense()))


@pytest.mark.parametrize("mode", ["factored", "merge"])
@pytest.mark.parametrize("whole", [True, False])
def test_a_time_major_output_keeps_every_step(mode, whole):
  wrap = _wrap_for(whole)
  prog = dense()
  base, ds, st = _stacked(prog.params, prog.targets)
  fn = lambda p, x: jnp.swapaxes(prog.fn(p, x), 0, 1)  # (T, B, V)
  x = _x(prog)
  ids = [1, 0, 2, -1]
  got = wrap(fn, mode)(base, st, x, adapter_ids=jnp.array(ids))
  assert got.shape == (3, B, 5)
  np.testing.assert_allclose(got, _per_row(fn, base, ds, ids, x, axis=1),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["factored", "merge"])
@pytest.mark.parametrize("whole", [True, False])
def test_outputs_without_rows(mode, whole):
  """A 0-d output that does not read the rows comes back as it is; one that
  reduces over the rows is refused, naming the output and adapter_ids."""
  wrap = _wrap_for(whole)
  prog = dense()
  base, ds, st = _stacked(prog.params, prog.targets)
  x, ids = _x(prog), jnp.array([0, 1, 2, 0])
  aux = lambda p, x: {"y": prog.fn(p, x), "aux": jnp.float32(3.5)}
  got = wrap(aux, mode)(base, st, x, adapter_ids=ids)
  assert got["aux"].shape == () and float(got["aux"]) == 3.5
  np.testing.assert_allclose(got["y"], _per_row(prog.fn, base, ds, ids, x),
                             rtol=2e-5, atol=2e-5)
  loss = lambda p, x: {"y": prog.fn(p, x), "loss": prog.fn(p, x).mean()}
  with pytest.raises(ValueError, match=r"output \['loss'\].*adapter_ids"):
    wrap(loss, mode)(base, st, x, adapter_ids=ids)


def test_mixed_dropout_draws_each_rows_own_mask():
  prog = dense()
  x = jnp.broadcast_to(_x(prog)[:1], (B, 3, D))  # four identical rows
  base, ds, st = _stacked(prog.params, prog.targets, dropout=0.5)
  ids, rng = jnp.array([1, 1, 1, 1]), jax.random.key(5)
  g = lj.wrap(prog.fn, "factored")
  # Run whole: the very masks of a single-adapter batch.
  got = g(base, st, x, adapter_ids=ids, lora_rng=rng)
  want = g(base, ds[1], x, lora_rng=rng)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert not np.allclose(got[0], got[1])
  # Under vmap over rows: each row its own key, so identical rows differ.
  g = _wrap_for(False)(prog.fn, "factored")
  got = g(base, st, x, adapter_ids=ids, lora_rng=rng)
  assert not np.allclose(got[0], got[1])
  assert not np.allclose(got[2], got[3])


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_bad_row_in_a_mixed_batch_stays_in_its_row(whole, bad):
  wrap = _wrap_for(whole)
  prog = gqa()
  base, ds, st = _stacked(prog.params, prog.targets, fn=prog.fn, x=_x(prog))
  x, ids = _x(prog), jnp.array([0, 1, 2, -1])
  g = jax.jit(wrap(prog.fn, "factored"))
  clean = g(base, st, x, adapter_ids=ids)
  dirty = g(base, st, x.at[0].set(bad), adapter_ids=ids)
  np.testing.assert_array_equal(dirty[1:], clean[1:])


def test_einsum_contractions_in_any_order_and_split_run_whole(monkeypatch):
  """tunix's attention output ``BTNH,NHD->BTD`` lists its contractions out
  of axis order, and its RoPE splits the head axis in two: the batch still
  runs whole (no vmap), equal to the rows run alone."""
  taken = []
  from lora_jax._src import mixed
  real = mixed.per_row
  monkeypatch.setattr(mixed, "per_row",
                      lambda *a, **k: taken.append(1) or real(*a, **k))
  k = _keys(2)
  params = {"q": _normal(k[0], (D, H, HD)), "o": _normal(k[1], (H, HD, D))}

  def fn(p, x):
    q = jnp.einsum("BTD,DNH->BTNH", x, p["q"])
    lo, hi = jnp.split(q, 2, axis=-1)
    q = jnp.concatenate([lo * 0.5 - hi, hi * 0.5 + lo], axis=-1)
    return jnp.einsum("BTNH,NHD->BTD", q, p["o"])
  x = jax.random.normal(jax.random.key(3), (4, 3, D))
  base, ds, st = _stacked(params, "q|o", fn=fn, x=x)
  ids = [2, 0, 1, -1]
  got = lj.wrap(fn, "factored")(base, st, x, adapter_ids=jnp.array(ids))
  assert not taken
  np.testing.assert_allclose(got, _per_row(fn, base, ds, ids, x),
                             rtol=2e-5, atol=2e-5)


# ---- forward mode -------------------------------------------------------------

def test_forward_mode_as_the_readme_says():
  """An eager ``jax.jvp`` falls back by itself with recompute on (the
  default); ``jax.linearize`` raises JAX's forward-mode error there and works
  with ``recompute=False``; all equal merge."""
  prog = dense()
  fn, base, delta = _base(prog, "f32")
  x, t = _x(prog), jax.random.normal(jax.random.key(9), _x(prog).shape)
  want = jax.jvp(lambda x: fn(lj.merge(base, delta), x), (x,), (t,))[1]
  g = lambda x: lj.wrap(fn, "factored")(base, delta, x)
  np.testing.assert_allclose(jax.jvp(g, (x,), (t,))[1], want,
                             rtol=2e-5, atol=2e-5)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.linearize(g, x)[1](t)
  g = lambda x: lj.wrap(fn, "factored", recompute=False)(base, delta, x)
  np.testing.assert_allclose(jax.linearize(g, x)[1](t), want,
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("make", [dense, siblings, gqa, scanned, remat],
                         ids=lambda m: m.__name__)
def test_a_mixed_batch_run_whole_equals_each_row_alone(monkeypatch, make,
                                                       recompute):
  """Siblings share one batched projection over rows, recompute regions form
  in that mode too; each row equals its adapter run alone."""
  from lora_jax._src.factored import interpreter
  grouped = []
  real = interpreter.project_group
  monkeypatch.setattr(interpreter, "project_group",
                      lambda g, x, r=None, known=None: grouped.append(r)
                      or real(g, x, r, known))
  taken = []
  from lora_jax._src import mixed
  real_per_row = mixed.per_row
  monkeypatch.setattr(mixed, "per_row",
                      lambda *a, **k: taken.append(1) or real_per_row(*a, **k))
  prog = make()
  x = _x(prog)
  base, ds, st = _stacked(prog.params, prog.targets, fn=prog.fn, x=x)
  ids = [2, 0, -1, 1]
  g = lj.wrap(prog.fn, "factored", recompute=recompute)
  got = g(base, st, x, adapter_ids=jnp.array(ids))
  assert not taken  # whole, no vmap
  if make in (siblings, gqa):  # q, k, v read one input
    assert grouped and all(r == 0 for r in grouped), grouped
  np.testing.assert_allclose(got, _per_row(prog.fn, base, ds, ids, x),
                             rtol=2e-5, atol=2e-5)


def _cond_program():
  """A program whose rows the analysis does not follow (lax.cond): mixed
  batches run under vmap over rows."""
  prog = cond()
  return prog, prog.fn


PATHS = ["whole", "vmap", "merge"]


def _run(path, fn, base, st, x, ids, jit=False, **kw):
  g = _wrap_for(path == "whole")(fn, "merge" if path == "merge" else "factored")
  g = jax.jit(g) if jit else g
  return g(base, st, x, adapter_ids=ids, **kw)


@pytest.mark.parametrize("path", PATHS)
def test_adapter_ids_out_of_range(path):
  """Concrete ids outside [-1, n) are an error naming them; under jit
  (ids unknown) their rows come out NaN on every path, the others exact."""
  prog = dense()
  base, ds, st = _stacked(prog.params, prog.targets)
  x = _x(prog)
  with pytest.raises(ValueError, match=r"adapter_ids \[-2, 3\] are outside \[-1, 3\)"):
    _run(path, prog.fn, base, st, x, jnp.array([0, 3, -2, 1]))
  got = _run(path, prog.fn, base, st, x, jnp.array([0, 3, -2, 1]),
             jit=True)
  assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
  want = _per_row(prog.fn, base, ds, [0, 0, 0, 1], x)
  np.testing.assert_allclose(got[np.array([0, 3])], want[np.array([0, 3])],
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", PATHS)
def test_a_non_finite_adapter_stays_in_its_rows(path):
  """One diverged adapter in the stack (inf in b) reaches only the rows
  that use it; a base row (-1) gathers nothing of it."""
  prog, fn = _cond_program() if path == "vmap" else (dense(), dense().fn)
  base, ds, st = _stacked(prog.params, prog.targets)
  bad = jax.tree.map(lambda d: d.replace(b=d.b.at[0].set(jnp.inf))
                     if isinstance(d, lj.LoraDelta) else d, ds[0],
                     is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  st = lj.stack([bad, ds[1], ds[2]])
  x = _x(prog)
  got = _run(path, fn, base, st, x, jnp.array([1, -1, 2, 0]))
  want = _per_row(fn, base, ds, [1, -1, 2], x[:3])
  np.testing.assert_allclose(got[:3], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", ["vmap", "merge"])
def test_one_row_on_a_program_whose_rows_are_not_followed(path):
  prog, fn = _cond_program()
  base, ds, st = _stacked(prog.params, prog.targets)
  x = _x(prog)[:1]
  for k in (-1, 2):
    got = _run(path, fn, base, st, x, jnp.array([k]))
    np.testing.assert_allclose(got, _per_row(fn, base, ds, [k], x),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", PATHS)
def test_an_output_reading_the_kernels_but_no_row_is_refused(path):
  prog = dense()
  base, ds, st = _stacked(prog.params, prog.targets)
  fn = lambda p, x: {"y": prog.fn(p, x), "l2": jnp.sum(p["fc1"] ** 2)}
  with pytest.raises(ValueError, match=r"output \['l2'\].*reads no row but "
                                       r"reads the adapted kernels"):
    _run(path, fn, base, st, _x(prog), jnp.array([0, 1, 2, 0]))


@pytest.mark.parametrize("mode", ["factored", "merge"])
def test_dora_stack_base_rows_are_the_base_model(mode):
  """A row with id -1 in a DoRA stack is the base model (its magnitude is
  ||W0||, not another adapter's)."""
  prog = dense()
  ds = []
  for k in range(2):
    base, d = lj.split(prog.params, lj.LoraConfig(rank=2, targets="fc1|fc2",
                                                  dora=True),
                       jax.random.key(k))
    d = randomize(d, seed=k)
    ds.append(jax.tree.map(lambda d: d.replace(magnitude=d.magnitude * 1.5)
                           if isinstance(d, lj.LoraDelta) else d, d,
                           is_leaf=lambda d: isinstance(d, lj.LoraDelta)))
  x, ids = _x(prog), [-1, 0, 1, -1]
  got = lj.wrap(prog.fn, mode)(base, lj.stack(ds), x, adapter_ids=jnp.array(ids))
  np.testing.assert_allclose(got, _per_row(prog.fn, base, ds, ids, x),
                             rtol=2e-5, atol=2e-5)
