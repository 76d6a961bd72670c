"""The jaxpr core: one test per view op, per consumer and per higher-order
primitive, on whatever JAX runs the suite (CI runs the oldest and the newest
we support). Each case traces a small program through the op, checks what
the core reads off the equation, the layout discovery finds, and that the
factored engine (strict: no merge fallback) equals the merge engine."""

import dataclasses

from helpers import make_mesh
from helpers import randomize
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import jaxpr_core as jc  # the module under test

W = jax.random.normal(jax.random.key(0), (6, 5)) * 0.3
STACK = jax.random.normal(jax.random.key(1), (3, 6, 5)) * 0.3
SQUARE = jax.random.normal(jax.random.key(5), (3, 6, 6)) * 0.3  # loop bodies
EVEN = jax.random.normal(jax.random.key(6), (6, 4)) * 0.3  # splits over 2
X = jax.random.normal(jax.random.key(2), (4, 6))
DENSE = lj.Layout.dense()
STACKED = lj.Layout((0,), (1,), (2,))


@jax.custom_jvp
def _cj(x, w):
  return x @ w


_cj.defjvp(lambda p, t: (_cj(*p), t[0] @ p[1] + p[0] @ t[1]))


@jax.custom_vjp
def _cv(x, w):
  return x @ w


_cv.defvjp(lambda x, w: (x @ w, (x, w)),
           lambda r, g: (g @ r[1].T, r[0].T @ g))


def _shard_map(f, **kw):
  sm = getattr(jax, "shard_map", None)
  if sm is None:
    from jax.experimental.shard_map import shard_map as sm
  return sm(f, **kw)


@dataclasses.dataclass
class Case:
  fn: object            # (params, x) -> array
  kernel: object        # the array under "w"
  layout: lj.Layout     # what discovery must find
  primitive: str = ""   # an equation that must appear in the traced program
  rule: str = "dot_general"
  rtol: float = 1e-5
  reverse: bool = True  # while loops with a traced trip count: forward only
  forward: bool = True  # a custom_vjp function: reverse only (in JAX itself)


def _sharded(p, x):
  w = jax.lax.with_sharding_constraint(
      p["w"], jax.sharding.NamedSharding(make_mesh((2,), ("d",)), P(None, "d")))
  return x @ w


def _in_shard_map(p, x):
  # the replicated kernel enters the manual region and passes through pvary
  f = lambda w, x: x @ w
  return _shard_map(f, mesh=make_mesh((2,), ("d",)), in_specs=(P(), P("d")),
                    out_specs=P("d"))(p["w"], x)


VIEWS = {
    "transpose": Case(lambda p, x: x @ p["w"].T.T, W, DENSE, "transpose"),
    "transposed_storage": Case(lambda p, x: x @ p["w"].T, W.T,
                               lj.Layout.transposed(), "transpose"),
    # A bf16 kernel used in float32: the merge engine rounds W0 + s a b to
    # bf16, the factored engine keeps the branch in float32 (hence rtol).
    "convert_element_type": Case(
        lambda p, x: x @ p["w"].astype(jnp.float32), W.astype(jnp.bfloat16),
        DENSE, "convert_element_type", rtol=2e-2),
    "copy": Case(lambda p, x: x @ jnp.array(p["w"], copy=True), W, DENSE),
    "stop_gradient": Case(lambda p, x: x @ jax.lax.stop_gradient(p["w"]) + x @ p["w"],
                          W, DENSE, "stop_gradient"),
    "sharding_constraint": Case(_sharded, EVEN, DENSE, "sharding_constraint"),
    "pvary_in_shard_map": Case(_in_shard_map, W, DENSE, "shard_map"),
    "slice_of_stack": Case(lambda p, x: x @ p["w"][1], STACK, STACKED, "squeeze"),
    "dynamic_slice_of_stack": Case(
        lambda p, x: x @ jax.lax.dynamic_index_in_dim(
            p["w"], jnp.argmax(x[0, :3]), keepdims=False),
        STACK, STACKED, "dynamic_slice"),
    "slice_of_outputs": Case(lambda p, x: x @ p["w"][:, 1:4], W, DENSE, "slice"),
}

CONSUMERS = {
    "dot_general": Case(lambda p, x: jnp.einsum("bi,io->bo", x, p["w"]), W,
                        DENSE, "dot_general"),
    "dot_general_batched": Case(
        lambda p, x: jnp.einsum("lbi,lio->lbo", jnp.stack([x] * 3), p["w"]),
        STACK, STACKED, "dot_general"),
    "conv_general_dilated": Case(
        lambda p, x: jax.lax.conv_general_dilated(
            x.reshape(1, 4, 6), p["w"], (1,), "SAME",
            dimension_numbers=("NWC", "WIO", "NWC")),
        jax.random.normal(jax.random.key(3), (3, 6, 5)) * 0.3,
        lj.Layout((), (0, 1), (2,)), "conv_general_dilated",
        "conv_general_dilated"),
    "gather": Case(lambda p, x: p["w"][jnp.array([0, 2, 5])] * x[:3, :5], W,
                   DENSE, "gather", "gather"),
    "ragged_dot_general": Case(
        lambda p, x: jax.lax.ragged_dot(x, p["w"], jnp.array([1, 2, 1],
                                                             jnp.int32)),
        STACK, STACKED, "ragged_dot_general", "ragged_dot_general"),
}

HIGHER_ORDER = {
    "jit": Case(lambda p, x: jax.jit(lambda w, x: x @ w)(p["w"], x), W, DENSE),
    "closed_call": Case(
        lambda p, x: jax.jit(lambda w, x: x @ w, inline=False)(p["w"], x), W,
        DENSE),
    "scan": Case(lambda p, x: jax.lax.scan(
        lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0], SQUARE, STACKED,
                 "scan"),
    "scan_consts": Case(lambda p, x: jax.lax.scan(
        lambda c, _: (jnp.tanh(c @ p["w"]), None), x, None, length=2)[0],
                        SQUARE[0], DENSE, "scan"),
    "while": Case(lambda p, x: jax.lax.while_loop(
        lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])),
        (0, x))[1], SQUARE[0], DENSE, "while", reverse=False),
    "cond": Case(lambda p, x: jax.lax.cond(
        x[0, 0] > 0, lambda x: x @ p["w"], lambda x: -(x @ p["w"]), x), W,
                 DENSE, "cond"),
    "remat": Case(lambda p, x: jax.checkpoint(lambda w, x: x @ w)(p["w"], x),
                  W, DENSE),
    "custom_jvp": Case(lambda p, x: _cj(x, p["w"]), W, DENSE, "custom_jvp_call"),
    "custom_vjp": Case(lambda p, x: _cv(x, p["w"]), W, DENSE, forward=False),
    "shard_map": Case(_in_shard_map, W, DENSE, "shard_map"),
}


def _check(case: Case):
  params = {"w": case.kernel}
  # (1) the traced program holds the op under test
  text = str(jax.make_jaxpr(case.fn)(params, X))
  assert case.primitive in text
  # (2) layout discovery reads it
  cfg = lj.LoraConfig(rank=2, alpha=2.0, targets="w")
  base, delta = lj.split(params, cfg, jax.random.key(4), apply_fn=case.fn,
                         example_args=(X,))
  assert lj.adapters(delta)["w"].layout == case.layout
  delta = randomize(delta)
  # (3) the factored engine follows it without merging and equals merge
  report = lj.explain(case.fn, base, delta, X, mode="factored")
  assert report.fallbacks == {}
  assert report.rules["w"] == [case.rule]
  fact = lj.wrap(case.fn, "factored", strict=True)
  merged = lj.wrap(case.fn, "merge")
  np.testing.assert_allclose(fact(base, delta, X), merged(base, delta, X),
                             rtol=case.rtol, atol=case.rtol)
  loss = lambda apply: lambda d: jnp.sum(jnp.sin(apply(base, d, X)))
  # forward mode (tangent: the delta itself) and reverse mode
  if case.forward:
    (_, t_f), (_, t_m) = (jax.jvp(loss(f), (delta,), (delta,))
                          for f in (fact, merged))
    np.testing.assert_allclose(t_f, t_m, rtol=10 * case.rtol)
  if case.reverse:
    for g_f, g_m in zip(jax.tree.leaves(jax.grad(loss(fact))(delta)),
                        jax.tree.leaves(jax.grad(loss(merged))(delta))):
      np.testing.assert_allclose(g_f, g_m, rtol=10 * case.rtol,
                                 atol=10 * case.rtol)


@pytest.mark.parametrize("name", list(VIEWS))
def test_view(name):
  _check(VIEWS[name])


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_consumer(name):
  _check(CONSUMERS[name])


@pytest.mark.parametrize("name", list(HIGHER_ORDER))
def test_higher_order(name):
  _check(HIGHER_ORDER[name])


def _eqns(fn, *args, name):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [e for e in jaxpr.eqns if e.primitive.name == name or (
      name == "jit" and e.primitive.name in ("jit", "pjit"))]


def test_scan_operands_split_into_consts_carry_xs():
  c = jnp.arange(6.0)
  fn = lambda w, x: jax.lax.scan(lambda h, wi: (h @ wi + c, h.sum()), x, w)
  (eqn,) = _eqns(fn, SQUARE, X, name="scan")
  sub = jc.higher_order(eqn)
  assert isinstance(sub, jc.Scan)
  assert (sub.num_consts, sub.num_carry, sub.length) == (1, 1, 3)
  assert len(sub.body.jaxpr.invars) == len(eqn.invars) == 3


def test_while_cond_remat_call_structures():
  (w_eqn,) = _eqns(lambda x: jax.lax.while_loop(
      lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2, c[2]), (0, x, x)),
                   X, name="while")
  sub = jc.higher_order(w_eqn)
  assert isinstance(sub, jc.While)
  assert (sub.cond_nconsts + sub.body_nconsts + len(w_eqn.outvars)
          == len(w_eqn.invars) == len(sub.body.jaxpr.invars))
  (c_eqn,) = _eqns(lambda x: jax.lax.cond(True, jnp.sin, jnp.cos, x), X,
                   name="cond")
  assert len(jc.higher_order(c_eqn).branches) == 2
  (r_eqn,) = _eqns(jax.checkpoint(jnp.sin, policy=jax.checkpoint_policies
                                  .dots_saveable), X, name="remat2") or _eqns(
                                      jax.checkpoint(jnp.sin), X,
                                      name="checkpoint")
  sub = jc.higher_order(r_eqn)
  assert isinstance(sub, jc.Remat) and sub.prevent_cse is True
  (j_eqn,) = _eqns(lambda x: jax.jit(jnp.sin)(x), X, name="jit")
  sub = jc.higher_order(j_eqn)
  assert isinstance(sub, jc.Call) and len(sub.body.jaxpr.invars) == 1


def test_dot_dims_read_from_the_equation():
  (eqn,) = _eqns(lambda x, w: jnp.einsum("lbi,lio->lbo", x, w),
                 jnp.stack([X] * 3), STACK, name="dot_general")
  dims = jc.dot_dims(eqn)
  assert (dims.lhs_contract, dims.rhs_contract) == ((2,), (1,))
  assert (dims.lhs_batch, dims.rhs_batch) == ((0,), (0,))
  assert dims.side(kernel_is_lhs=False) == ((2,), (1,), (0,), (0,))


class _FakeEqn:
  """An equation of a known primitive whose parameters lost a field, as a
  future JAX might."""

  def __init__(self, eqn, drop):
    self.primitive, self.invars, self.outvars = (eqn.primitive, eqn.invars,
                                                 eqn.outvars)
    self.params = {k: v for k, v in eqn.params.items() if k not in drop}


def test_unknown_schema_is_a_named_error_not_a_key_error():
  (eqn,) = _eqns(lambda w, x: jax.lax.scan(lambda c, wi: (c, None), x, w),
                 STACK, X, name="scan")
  fake = _FakeEqn(eqn, {"num_consts", "num_carry", "ft_in", "ft_out"})
  with pytest.raises(jc.UnknownSchemaError) as err:
    jc.higher_order(fake)
  msg = str(err.value)
  assert "'scan'" in msg and f"JAX {jax.__version__}" in msg


def test_unknown_consumer_in_discovery_names_the_primitive_and_the_remedy():
  fn = lambda p, x: x @ jnp.cumsum(p["w"], axis=0)
  with pytest.raises(ValueError, match=r"JAX "
                     + jax.__version__.replace(".", r"\.")
                     + r"\) it is consumed by cumsum.*"
                     r"LoraConfig\(layouts=\{'w': lora_jax.Layout"):
    lj.split({"w": STACK}, lj.LoraConfig(rank=2, targets="w"),
             jax.random.key(0), apply_fn=fn, example_args=(X,))


def test_unknown_schema_in_the_engine_is_a_counted_fallback(monkeypatch):
  """A future JAX renaming a dot_general parameter: the reader raises
  UnknownSchemaError (not a bare KeyError), and the engine merges that kernel
  (counted, an error under strict)."""
  real = jc.dot_dims

  @jc.reads_params
  def renamed(eqn):
    return eqn.params["dimension_numbers_v2"]
  params = {"w": W}
  fn = lambda p, x: x @ p["w"]
  base, delta = lj.split(params, lj.LoraConfig(rank=2, targets="w"),
                         jax.random.key(0))
  delta = randomize(delta)
  monkeypatch.setattr(jc, "dot_dims", renamed)
  with pytest.warns(UserWarning, match="'dot_general' consumes 'w'"):
    got = lj.wrap(fn, "factored")(base, delta, X)
  with pytest.raises(lj.FallbackError, match="'dot_general' consuming 'w'"):
    lj.wrap(fn, "factored", strict=True)(base, delta, X)
  monkeypatch.setattr(jc, "dot_dims", real)
  np.testing.assert_allclose(got, X @ lj.merge(base, delta)["w"], rtol=1e-5)


def test_value_key_tells_apart_what_acts_differently():
  vk = jc.value_key
  assert vk(0.0) != vk(-0.0) and vk(1) != vk(1.0) and vk(1) != vk(True)
  assert vk(np.float32(0.5)) == vk(np.float32(0.5))
  assert vk(np.float32(0.5)) != vk(np.float64(0.5))
  assert vk(np.array([0.0], np.float32)) != vk(np.array([-0.0], np.float32))
  assert vk((1, (2, "a"))) == vk((1, (2, "a"))) != vk([1, (2, "a")])
  f = lambda x: x
  assert vk(f) == vk(f) != vk(lambda x: x)  # functions: only themselves
  with pytest.raises(jc.NoKey):
    vk(jnp.ones(2))  # data is not a parameter
  with pytest.raises(jc.NoKey):
    vk(bytearray(b"x"))  # unhashable


def test_equations_key_is_the_computation_not_the_variables():
  def block(x, s, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * s

  def eqns_of(eps, shape=(4, 8)):
    closed = jax.make_jaxpr(lambda x, s: block(x, s, eps))(
        jnp.ones(shape), jnp.ones(shape[-1:]))
    return closed.jaxpr.eqns, closed.jaxpr.invars

  key = lambda e: jc.equations_key(*e)
  assert key(eqns_of(1e-6)) == key(eqns_of(1e-6))  # other variables
  assert key(eqns_of(1e-6)) != key(eqns_of(1e-5))  # another literal
  assert key(eqns_of(1e-6)) != key(eqns_of(1e-6, (2, 8)))  # other shapes
  eqns, invars = eqns_of(1e-6)
  with pytest.raises(jc.NoKey, match="outside"):
    jc.equations_key(eqns[1:], invars)  # reads the first one's output
