"""lora_jax.nnx: an NNX module with nnx.LoRAParam factors, on NNX models of
our own (Linear, Einsum, Embed, an nnx.scan stack, Dropout, BatchNorm, a
KV-cache-like Variable and a decode method taking and returning a cache)."""

import inspect

from flax import nnx
from helpers import randomize
from helpers import spec_names
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
import lora_jax.nnx as ljn

VOCAB, D, HEADS, HD, LAYERS = 16, 8, 2, 4, 2


class Seen(nnx.Variable):
  """Mutable per-call state stored on the model (like flax's decode cache)."""


class Layer(nnx.Module):
  def __init__(self, rngs, dtype):
    self.mlp = nnx.Linear(D, D, rngs=rngs, dtype=dtype, param_dtype=dtype)

  def __call__(self, x):
    return x + jnp.tanh(self.mlp(x))


class Net(nnx.Module):
  """Embed -> einsum attention-ish -> BatchNorm -> Dropout -> scanned
  Linear layers -> head. ``decode`` takes and returns a cache, as tunix's
  decoders do."""

  def __init__(self, rngs, dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=dtype)
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs, **kw)
    self.q = nnx.Einsum("btd,dnh->btnh", (D, HEADS, HD), rngs=rngs, **kw)
    self.o = nnx.Einsum("btnh,nhd->btd", (HEADS, HD, D), rngs=rngs, **kw)
    self.norm = nnx.BatchNorm(D, rngs=rngs, **kw)
    self.regularize = nnx.Dropout(0.25, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Layer(rngs, dtype)
    self.layers = make(rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs, **kw)
    self.seen = Seen(jnp.zeros((), jnp.int32))
    self.config = {"dtype": dtype, "layers": LAYERS}

  def features(self, tok):
    x = self.embed(tok)
    x = x + self.o(self.q(x))
    x = self.norm(x.reshape(-1, D)).reshape(x.shape)
    x = self.regularize(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)
    return body(x, self.layers)

  def __call__(self, tok, last_only: bool = False):
    self.seen.value += tok.shape[1]
    x = self.features(tok)
    return self.head(x[:, -1:] if last_only else x)

  def decode(self, tok, cache):
    """One step with a cache of past features: (logits, new cache)."""
    x = self.features(tok)
    cache = {"k": jnp.concatenate([cache["k"][:, 1:], x], axis=1),
             "n": cache["n"] + 1}
    return self.head(cache["k"].mean(axis=1, keepdims=True)), cache

  def init_cache(self, batch, length):
    return {"k": jnp.zeros((batch, length, D), self.config["dtype"]),
            "n": jnp.zeros((), jnp.int32)}


CONFIG = lj.LoraConfig(rank=2, alpha=4.0)  # all-linear: q, o, layers, not head
TOK = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % VOCAB


def _np(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _state(model, *filters):
  return jax.tree.map(_np, nnx.state(model, *filters).to_pure_dict())


def _equal_trees(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.array_equal(x, y) for x, y in zip(la, lb))


def _adapted(dtype=jnp.float32, config=CONFIG):
  """(model, m): m = apply_lora(model) with random non-zero factors."""
  # built under jit: its init compiles once instead of op by op (half the time)
  model = nnx.jit(lambda: Net(nnx.Rngs(0), dtype))()
  m = ljn.apply_lora(model, config, jax.random.key(1), TOK)
  ljn.set_delta(m, randomize(ljn.get_delta(m), scale=0.5))
  return model, m


@pytest.fixture(scope="module")
def adapted():
  model, m = _adapted()
  return model, m, _state(model)


def _compiled(method="__call__", **static):
  """``model.method(*args, **static)`` under nnx.jit: the reference models
  compile once instead of dispatching op by op (a third of the time)."""
  return nnx.jit(lambda model, *args: getattr(model, method)(*args, **static))


def _functional(model):
  """The functional form: f(params, rest, *args) over nnx.split's state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(p, r, tok):
    return nnx.merge(graphdef, p, jax.tree.map(lambda x: x, r))(tok)
  return f, params, rest


def test_contract(adapted):
  model, m, _ = adapted
  lora = [p for p, _ in lj.leaves_with_paths(nnx.state(m, nnx.LoRAParam))]
  assert lora == ["lora/layers/mlp/kernel/a", "lora/layers/mlp/kernel/b",
                  "lora/o/kernel/a", "lora/o/kernel/b",
                  "lora/q/kernel/a", "lora/q/kernel/b"]
  # the frozen weights are Params, never LoRAParams
  frozen = nnx.state(m.base_model, nnx.Param)
  assert not lj.leaves_with_paths(nnx.state(m.base_model, nnx.LoRAParam))
  assert _equal_trees(_state(m.base_model, nnx.Param), _state(model, nnx.Param))
  assert len(jax.tree.leaves(frozen)) == 9
  assert type(m).__name__ == "LoraNet" and isinstance(m, ljn.LoraModule)
  assert list(inspect.signature(m.__call__).parameters) == ["tok", "last_only"]
  assert list(inspect.signature(m.decode).parameters) == ["tok", "cache"]
  assert m.config == model.config
  assert hasattr(m, "init_cache") and not hasattr(m, "no_such_thing")
  # a call adds no attribute (nnx.cached_partial, the Sampler's graphdef)
  m.eval()  # eval() itself sets static attributes (deterministic=True)
  graphdef = nnx.graphdef(m)
  m(TOK)
  assert nnx.graphdef(m) == graphdef
  # shapes as LoraDelta: a (*batch, *in, r), b (*batch, r, *out)
  d = ljn.get_delta(m)
  assert d["layers"]["mlp"]["kernel"].a.shape == (LAYERS, D, 2)
  assert d["q"]["kernel"].b.shape == (2, HEADS, HD)
  assert d["o"]["kernel"].a.shape == (HEADS, HD, 2)
  assert d["head"]["kernel"] is None and d["embed"]["embedding"] is None


def test_calls_and_state_equal_the_merged_model(adapted):
  """Training mode: dropout draws from the RNG counter, BatchNorm updates its
  statistics, ``seen`` counts tokens; all as on the merged model."""
  model, m, before = adapted
  m.train()
  seen = int(m.base_model.seen[...])
  plain = ljn.merge(m)  # same class, merged weights, a copy of m's state
  assert type(plain) is Net and not jax.tree.leaves(
      nnx.state(plain, nnx.LoRAParam))
  for kw in ({}, {"last_only": True}):
    got, want = m(TOK, **kw), _compiled(**kw)(plain, TOK)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  rest_m = _state(m.base_model, nnx.Not(nnx.Param))
  rest_p = _state(plain, nnx.Not(nnx.Param))
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6)
  jax.tree.map(chex_close, rest_m, rest_p)
  assert int(m.base_model.seen[...]) == seen + 12
  # the decode path, a cache in and out, and a method that reads no kernel
  cache = m.init_cache(2, 3)
  assert jax.tree.map(jnp.shape, cache) == {"k": (2, 3, D), "n": ()}
  decode = _compiled("decode")
  for _ in range(2):
    (got, cache), (want, cache_p) = (m.decode(TOK[:, :1], cache),
                                     decode(plain, TOK[:, :1], cache))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(chex_close, cache, cache_p)
  # the merged model is the original class loaded with lj.merge's weights
  f, params, rest = _functional(model)
  merged = lj.merge(params, ljn.get_delta(m))
  assert _equal_trees(_state(plain, nnx.Param),
                      jax.tree.map(np.asarray, merged.to_pure_dict()))
  # the input model is untouched
  assert _equal_trees(_state(model), before)
  m.eval()


def test_gradients_equal_wrap(adapted):
  model, m, _ = adapted
  m.eval()

  def loss(mm, tok):
    return jnp.mean(mm(tok) ** 2)
  got = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(
      m, TOK)

  f, params, rest = _functional(m.base_model)  # m's batch statistics
  apply = lj.wrap(f)
  want = jax.jit(jax.grad(
      lambda d: jnp.mean(apply(params, d, rest, TOK) ** 2)))(ljn.get_delta(m))
  want = lj.adapters(want)
  got = {p: v for p, v in lj.leaves_with_paths(got)}
  assert len(got) == 2 * len(want)
  for path, d in want.items():
    for name in ("a", "b"):
      np.testing.assert_allclose(got[f"lora/{path}/{name}"],
                                 getattr(d, name), rtol=1e-5, atol=1e-6)


def _lora_step(mm, opt, x):
  """One optimizer step on the factors only (as tunix's PeftTrainer):
  the loss mean((m(x) - 1)^2), its value returned."""
  value, grads = nnx.value_and_grad(
      lambda mm, x: jnp.mean((mm(x) - 1.0) ** 2),
      argnums=nnx.DiffState(0, nnx.LoRAParam))(mm, x)
  opt.update(mm, grads)
  return value


def test_optimizer_steps_train_only_the_factors(adapted):
  """nnx.Optimizer(wrt=nnx.LoRAParam) under nnx.jit / nnx.cached_partial
  (tunix's PeftTrainer) against the functional lj.wrap loop."""
  model = nnx.clone(adapted[0])
  model.eval()
  m = ljn.apply_lora(model, CONFIG, jax.random.key(1), TOK)
  ljn.set_delta(m, randomize(ljn.get_delta(m), scale=0.5))
  delta0 = ljn.get_delta(m)
  frozen = _state(m.base_model, nnx.Param)
  tx = optax.adam(1e-2)
  opt = nnx.Optimizer(m, tx, wrt=nnx.LoRAParam)

  train = nnx.cached_partial(nnx.jit(_lora_step), m, opt)
  losses = [float(train(TOK)) for _ in range(3)]
  assert losses[2] < losses[0]

  f, params, rest = _functional(model)
  apply = lj.wrap(f)

  @jax.jit
  def fstep(delta, state):
    value, g = jax.value_and_grad(
        lambda d: jnp.mean((apply(params, d, rest, TOK) - 1.0) ** 2))(delta)
    updates, state = tx.update(g, state, delta)
    return optax.apply_updates(delta, updates), state, value
  delta, state = delta0, tx.init(delta0)
  flosses = []
  for _ in range(3):
    delta, state, value = fstep(delta, state)
    flosses.append(float(value))
  np.testing.assert_allclose(losses, flosses, rtol=1e-5)
  got, want = lj.adapters(ljn.get_delta(m)), lj.adapters(delta)
  for path in want:
    for name in ("a", "b"):
      np.testing.assert_allclose(getattr(got[path], name),
                                 getattr(want[path], name), rtol=1e-5,
                                 atol=1e-6)
  # the frozen weights: bitwise the same
  assert _equal_trees(_state(m.base_model, nnx.Param), frozen)


def test_bf16_model_and_a_sampler_style_merge_inside_jit():
  """bf16 kernels, float32 factors: the first leaf of nnx.variables(m) (where
  tunix's Sampler reads the cache dtype) is the model's own bf16 leaf, and
  graphdef + flattened variables merged inside jit decode as merge(m)."""
  model, m = _adapted(jnp.bfloat16)
  m.eval()
  assert jax.tree.leaves(nnx.variables(m))[0].dtype == jnp.bfloat16
  assert (jax.tree.leaves(nnx.variables(m))[0].dtype
          == jax.tree.leaves(nnx.variables(model))[0].dtype)
  assert ljn.get_delta(m)["q"]["kernel"].a.dtype == jnp.float32
  plain = ljn.merge(m)
  assert plain.q.kernel[...].dtype == jnp.bfloat16
  graphdef = nnx.graphdef(m)
  leaves, treedef = jax.tree.flatten(nnx.variables(m))
  dtype = leaves[0].dtype

  @jax.jit
  def decode(leaves, tok, cache):
    mm = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return mm.decode(tok, cache)
  cache = {"k": jnp.zeros((2, 3, D), dtype), "n": jnp.zeros((), jnp.int32)}
  got, got_cache = decode(leaves, TOK[:, :1], cache)
  want, want_cache = _compiled("decode")(plain, TOK[:, :1], cache)
  assert got.dtype == want.dtype == jnp.bfloat16
  assert got_cache["k"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=2e-2,
                             atol=2e-2)


def test_quantized_base(adapted):
  """A model whose kernels are lj.QArray (lj.quantize of its state)."""
  model = nnx.clone(adapted[0])
  model.eval()
  graphdef, state = nnx.split(model)
  f = lambda s, tok: nnx.merge(graphdef, jax.tree.map(lambda x: x, s))(tok)
  qstate = lj.quantize(state, "nf4", block_size=4, targets="all-linear",
                       apply_fn=f, example_args=(TOK,))
  qmodel = nnx.merge(graphdef, qstate)
  m = ljn.apply_lora(qmodel, CONFIG, jax.random.key(1), TOK)
  ljn.set_delta(m, randomize(ljn.get_delta(m), scale=0.5))
  kernel = m.base_model.q.kernel
  value = kernel.get_value() if hasattr(kernel, "get_value") else kernel.value
  assert isinstance(value, lj.QArray)
  want = jax.jit(lambda q, d: f(lj.merge(q, d), TOK))(qstate, ljn.get_delta(m))
  np.testing.assert_allclose(m(TOK), want, rtol=1e-5, atol=1e-5)
  assert _equal_trees(_state(ljn.merge(m), nnx.Param), jax.tree.map(
      np.asarray, lj.merge(nnx.state(m.base_model, nnx.Param),
                           ljn.get_delta(m)).to_pure_dict()))

  def loss(mm):
    return jnp.mean(mm(TOK) ** 2)
  got = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(m)
  want = lj.adapters(jax.jit(jax.grad(lambda d: jnp.mean(
      lj.wrap(f)(qstate, d, TOK) ** 2)))(ljn.get_delta(m)))
  np.testing.assert_allclose(got["lora"]["q"]["kernel"]["b"][...],
                             want["q/kernel"].b, rtol=1e-5, atol=1e-6)


def test_get_set_merge_round_trip_and_checkpoint(adapted, tmp_path):
  model, m, _ = adapted
  m.eval()
  delta = ljn.get_delta(m)
  lj.save(tmp_path / "adapter", delta, CONFIG)
  loaded = lj.load(tmp_path / "adapter")
  fresh = ljn.apply_lora(m.base_model, CONFIG, jax.random.key(7), TOK)
  fresh.eval()
  before = np.asarray(fresh(TOK))
  ljn.set_delta(fresh, loaded)
  np.testing.assert_array_equal(fresh(TOK), m(TOK))
  assert not np.allclose(before, m(TOK))
  again = lj.adapters(ljn.get_delta(fresh))
  for path, d in lj.adapters(delta).items():
    np.testing.assert_array_equal(again[path].a, d.a)
    np.testing.assert_array_equal(again[path].b, d.b)
  assert _equal_trees(_state(ljn.merge(fresh), nnx.Param),
                      _state(ljn.merge(m), nnx.Param))
  # PEFT export of the same delta
  # (PEFT has one module per kernel: the scanned stack needs module_names)
  lj.save_peft(tmp_path / "peft", dict(delta, layers=None), CONFIG)
  assert (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_dora(adapted):
  model = nnx.clone(adapted[0])
  model.eval()
  config = lj.LoraConfig(rank=2, dora=True, targets=r"q/kernel|layers/mlp/kernel")
  m = ljn.apply_lora(model, config, jax.random.key(1), TOK)
  assert sorted(p for p, _ in lj.leaves_with_paths(
      nnx.state(m, nnx.LoRAParam))) == [
          "lora/layers/mlp/kernel/a", "lora/layers/mlp/kernel/b",
          "lora/layers/mlp/kernel/magnitude", "lora/q/kernel/a",
          "lora/q/kernel/b", "lora/q/kernel/magnitude"]
  delta = randomize(ljn.get_delta(m), scale=0.5)
  ljn.set_delta(m, jax.tree.map(lambda x: x * 1.5, delta))
  np.testing.assert_allclose(m(TOK), _compiled()(ljn.merge(m), TOK),
                             rtol=1e-5, atol=1e-5)


def test_principal_init_keeps_the_residual_base(adapted):
  """PiSSA: the frozen base is the residual W0 - s*a@b, the model unchanged
  at init, and merge(m) is the original weights again."""
  model = adapted[0]
  config = lj.LoraConfig(rank=2, init="pissa", targets=r"layers/mlp/kernel")
  m = ljn.apply_lora(model, config, jax.random.key(1), TOK)
  m.eval()
  kernel = np.asarray(m.base_model.layers.mlp.kernel[...])
  original = np.asarray(model.layers.mlp.kernel[...])
  assert not np.allclose(kernel, original, atol=1e-3)
  np.testing.assert_allclose(ljn.merge(m).layers.mlp.kernel[...], original,
                             atol=1e-5)
  np.testing.assert_allclose(m(TOK), _compiled()(ljn.merge(m), TOK),
                             rtol=1e-5, atol=1e-5)


def test_lora_dropout_draws_a_key_per_training_call(adapted):
  model = nnx.clone(adapted[0])
  model.eval()  # the model's own dropout and batch norm off
  config = lj.LoraConfig(rank=2, alpha=4.0, dropout=0.5,
                         targets=r"layers/mlp/kernel")
  m = ljn.apply_lora(model, config, jax.random.key(1), TOK)
  ljn.set_delta(m, randomize(ljn.get_delta(m), scale=0.5))
  f, params, rest = _functional(m.base_model)
  functional = jax.jit(lambda d, key: lj.wrap(f)(params, d, rest, TOK,
                                                 lora_rng=key))
  plain = _compiled()(ljn.merge(m), TOK)
  for _ in range(2):  # each call draws the stream's next key
    key = nnx.clone(m.lora_rngs).lora_dropout()
    got = m(TOK)
    np.testing.assert_allclose(got, functional(ljn.get_delta(m), key),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-3)
  m.eval()  # LoRA dropout off, as nnx.Dropout
  assert m.deterministic
  np.testing.assert_allclose(m(TOK), plain, rtol=1e-5, atol=1e-5)


def test_misuse_is_an_error_naming_the_leaf(adapted):
  model, m, _ = adapted
  delta = ljn.get_delta(m)
  wrong_rank = lj.split(nnx.state(model, nnx.Param),
                        lj.LoraConfig(rank=3, alpha=6.0), jax.random.key(0),
                        apply_fn=_functional(model)[0],
                        example_args=(nnx.state(model, nnx.Not(nnx.Param)),
                                      TOK))[1]
  with pytest.raises(ValueError, match=r"layers/mlp/kernel/a is f32\[2,8,3\]"):
    ljn.set_delta(m, wrong_rank)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), delta)
  with pytest.raises(ValueError, match=r"layers/mlp/kernel/a is bf16"):
    ljn.set_delta(m, bf16)
  partial = dict(delta, q={"kernel": None})
  with pytest.raises(ValueError, match=r"missing \['q/kernel'\]"):
    ljn.set_delta(m, partial)
  rescaled = jax.tree.map(
      lambda d: d.replace(scale=1.0) if isinstance(d, lj.LoraDelta) else d,
      delta, is_leaf=lambda x: isinstance(x, lj.LoraDelta))
  with pytest.raises(ValueError, match=r"'layers/mlp/kernel' has scale 1"):
    ljn.set_delta(m, rescaled)
  # nothing was loaded by the failed calls
  for path, d in lj.adapters(ljn.get_delta(m)).items():
    np.testing.assert_array_equal(d.b, lj.adapters(delta)[path].b)
  with pytest.raises(ValueError, match="other than LoRA adapters"):
    ljn.set_delta(m, lj.stack([delta, delta]))
  with pytest.raises(ValueError, match="matches no leaf"):
    ljn.apply_lora(model, lj.LoraConfig(targets="nothing/kernel"),
                   jax.random.key(0))
  with pytest.raises(ValueError, match="already has adapters"):
    ljn.apply_lora(m, CONFIG, jax.random.key(0), TOK)
  with pytest.raises(ValueError, match="already has nnx.LoRAParam"):
    ljn.apply_lora(nnx.LoRA(4, 2, 3, rngs=nnx.Rngs(0)), CONFIG,
                   jax.random.key(0))
  with pytest.raises(ValueError, match="LoRA dropout acts on"):
    ljn.apply_lora(model, lj.LoraConfig(dropout=0.1), jax.random.key(0), TOK,
                   mode="merge")
  with pytest.raises(ValueError, match="mode must be one of"):
    ljn.apply_lora(model, CONFIG, jax.random.key(0), TOK, mode="fast")
  with pytest.raises(TypeError, match="expects a flax.nnx.Module"):
    ljn.apply_lora({"w": jnp.ones((2, 2))}, CONFIG, jax.random.key(0))
  with pytest.raises(TypeError, match="from lora_jax.nnx.apply_lora"):
    ljn.get_delta(model)


def test_nnx_objects_as_call_arguments_are_refused():
  """An nnx.Rngs (or Variable) argument would reach the model as a copy: its
  counter would not advance (the next call would reuse the dropout mask)
  and the mask differed from the merged model's. Refused, by argument."""

  class WithRngsArg(nnx.Module):
    def __init__(self):
      self.proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      self.drop = nnx.Dropout(0.5)

    def __call__(self, x, rngs=None):
      return self.drop(self.proj(x), rngs=rngs)

  m = ljn.apply_lora(WithRngsArg(), lj.LoraConfig(rank=2), jax.random.key(1))
  x = jnp.ones((2, 4))
  with pytest.raises(TypeError, match=r"kwargs\['rngs'\] \(Rngs\)"):
    m(x, rngs=nnx.Rngs(dropout=3))
  with pytest.raises(TypeError, match=r"args\[1\] \(RngStream\)"):
    m(x, nnx.Rngs(dropout=3).dropout)
  with pytest.raises(TypeError, match=r"kwargs\['rngs'\]\['c'\]\[0\] \(Cache"):
    m(x, rngs={"c": [nnx.Cache(jnp.ones(2))]})


def test_a_method_that_adds_cache_variables():
  """flax's MultiHeadAttention.init_cache adds nnx.Cache attributes (where
  there was None); the adapted module gains them, and decoding step by step
  equals merge(m)'s. A method changing a static attribute is an error."""
  mha = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=4,
                               decode=False, rngs=nnx.Rngs(0))
  xs = jax.random.normal(jax.random.key(0), (1, 3, 4))
  m = ljn.apply_lora(mha, lj.LoraConfig(rank=2, targets=r"(query|value)/kernel"),
                     jax.random.key(1), xs)
  ljn.set_delta(m, randomize(ljn.get_delta(m), scale=0.5))
  plain = ljn.merge(m)
  m.decode = True  # reaches the wrapped model (not a shadow on m)
  assert m.base_model.decode and "decode" not in vars(m)
  plain.decode = True
  m.init_cache((1, 3, 4))
  plain.init_cache((1, 3, 4))
  assert mha.cached_key is None  # the input model is untouched
  assert isinstance(m.base_model.cached_key, nnx.Cache)
  step = _compiled()
  for t in range(3):
    np.testing.assert_allclose(m(xs[:, t:t + 1]), step(plain, xs[:, t:t + 1]),
                               rtol=1e-5, atol=1e-6)
  assert int(m.base_model.cache_index[...]) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               _state(m.base_model, nnx.Cache), _state(plain, nnx.Cache))

  class Flag(nnx.Module):
    def __init__(self):
      self.proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      self.calls = 0

    def __call__(self, x):
      self.calls += 1  # a Python attribute: static to NNX
      return self.proj(x)

  flag = ljn.apply_lora(Flag(), lj.LoraConfig(rank=2), jax.random.key(1))
  with pytest.raises(ValueError, match=r"m.__call__\(...\) changed the "):
    flag(jnp.ones((2, 4)))


def test_state_of_another_rank_loaded_by_nnx_update_is_an_error(adapted):
  """RL weight sync / checkpoints go through nnx.update, which replaces the
  factors whatever their shape: a rank-3 state in a rank-2 module would run
  with the rank-2 scale. Refused at the next call, naming the factor."""
  model = nnx.clone(adapted[0])
  model.eval()
  small = ljn.apply_lora(model, lj.LoraConfig(rank=2, targets=r"q/kernel"),
                         jax.random.key(1), TOK)
  big = ljn.apply_lora(model, lj.LoraConfig(rank=3, targets=r"q/kernel"),
                       jax.random.key(1), TOK)
  nnx.update(small, nnx.state(big, nnx.LoRAParam))
  with pytest.raises(ValueError, match=r"q/kernel/a is f32\[8,3\], but this "
                     r"module's adapter was made f32\[8,2\]"):
    small(TOK)
  delta = ljn.get_delta(big)
  listed = dict(delta, q={"kernel": delta["q"]["kernel"].replace(
      b=np.ones((3, HEADS, HD)).tolist())})
  with pytest.raises(ValueError, match=r"q/kernel/b is a list, not an array"):
    ljn.set_delta(big, listed)


def _sharded_param(value, names):
  """``nnx.Param(value)`` with sharding metadata ``names``, as tunix's
  models declare it (``nnx.Param(..., sharding=...)``), on flax 0.11 and
  0.12 (whose ``sharding=`` at construction would reshard eagerly and want
  a mesh in context; a model built under one is the next test's)."""
  var = nnx.Param(value)
  if hasattr(var, "set_metadata"):
    var.set_metadata(out_sharding=names)
    return var
  return nnx.Param(value, sharding=names)


class Sharded(nnx.Module):
  """tunix-shaped: einsum kernels with per-axis sharding names, an MLP
  kernel, and a head without metadata."""

  def __init__(self, rngs):
    init = nnx.initializers.normal(0.3)
    self.q = _sharded_param(init(rngs.params(), (D, HEADS, HD)),
                            ("fsdp", "tp", None))
    self.o = _sharded_param(init(rngs.params(), (HEADS, HD, D)),
                            ("tp", None, "fsdp"))
    self.up = _sharded_param(init(rngs.params(), (D, 2 * D)), ("fsdp", "tp"))
    self.head = nnx.Param(init(rngs.params(), (2 * D, VOCAB)))

  def __call__(self, x):
    h = jnp.einsum("btnh,nhd->btd", jnp.einsum("btd,dnh->btnh", x,
                                               self.q.value), self.o.value)
    return jnp.tanh(h @ self.up.value) @ self.head.value


def test_factors_carry_their_kernels_sharding_metadata():
  """Trainers that shard by metadata (tunix's PeftTrainer shards the
  optimizer state by ``nnx.get_partition_spec``) see each factor sharded as
  its kernel: ``a`` by the kernel's input (and batch) axes, ``b`` by its
  output axes, the rank axis by none; a kernel without metadata gives
  factors without. The optimizer state inherits it. Placed by those specs
  on a 2 x 2 mesh, a training step equals the unsharded one."""
  model = Sharded(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (4, 3, D))
  config = lj.LoraConfig(rank=2, targets=r"q|o|up|head")
  m = ljn.apply_lora(model, config, jax.random.key(1), x)
  ljn.set_delta(m, randomize(ljn.get_delta(m), scale=0.5))
  specs = spec_names(nnx.state(m, nnx.LoRAParam))
  assert specs == {
      "lora/q/a": ("fsdp", None), "lora/q/b": (None, "tp", None),
      "lora/o/a": ("tp", None, None), "lora/o/b": (None, "fsdp"),
      "lora/up/a": ("fsdp", None), "lora/up/b": (None, "tp"),
      "lora/head/a": (), "lora/head/b": ()}, specs
  tx = optax.adam(1e-2)
  opt = nnx.Optimizer(m, tx, wrt=nnx.LoRAParam)
  opt_specs = spec_names(nnx.state(opt, nnx.optimizer.OptState))
  mu = {k: v for k, v in opt_specs.items() if "/mu/" in f"/{k}/"}
  assert mu and all(v == specs["lora/" + k.split("/lora/", 1)[1]]
                    for k, v in mu.items()), mu
  plain = nnx.clone((m, opt))
  want = [float(nnx.jit(_lora_step)(*plain, x)) for _ in range(2)]
  # as tunix does: every state placed by its metadata's partition spec
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2),
                           ("fsdp", "tp"))
  for tree in (m, opt):
    state = nnx.state(tree)
    pspecs = nnx.get_partition_spec(state)
    nnx.update(tree, jax.tree.map(
        lambda v, p: jax.device_put(v, jax.sharding.NamedSharding(
            mesh, p if p is not None else jax.sharding.PartitionSpec())),
        state, pspecs))
  a = nnx.state(m, nnx.LoRAParam)["lora"]["q"]["a"]
  a = a.value if hasattr(a, "value") else a
  assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  got = [float(nnx.jit(_lora_step)(m, opt, x)) for _ in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for path, d in lj.adapters(ljn.get_delta(m)).items():
    ref = lj.adapters(ljn.get_delta(plain[0]))[path]
    # sharded sums add in another order; Adam's step is ~lr wherever the
    # gradient is small, whatever its rounding
    np.testing.assert_allclose(d.a, ref.a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d.b, ref.b, rtol=1e-4, atol=1e-4)


def test_sharding_metadata_longer_than_the_kernel_is_an_error():
  model = Sharded(nnx.Rngs(0))
  if hasattr(model.up, "set_metadata"):
    model.up.set_metadata(out_sharding=("fsdp", "tp", None))
  else:
    model.up = nnx.Param(model.up.value, sharding=("fsdp", "tp", None))
  x = jax.random.normal(jax.random.key(2), (4, 3, D))
  with pytest.raises(ValueError, match=r"kernel 'up' has sharding metadata "
                     r".*3 names for its 2 axes"):
    ljn.apply_lora(model, lj.LoraConfig(rank=2, targets="up"),
                   jax.random.key(1), x)


def test_sharding_metadata_as_a_named_sharding():
  """A kernel whose metadata is a NamedSharding (flax 0.12 takes one, its
  mesh in place of one in context): the factors get the names
  lj.factor_specs gives and the mesh, so nnx.get_partition_spec of the
  factors alone (a PeftTrainer's optimizer state) reads them, and compute as
  merge; metadata of another kind is an error naming the kernel."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2),
                           ("fsdp", "tp"))
  named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "fsdp", "tp"))
  x = jax.random.normal(jax.random.key(2), (4, 3, D))
  config = lj.LoraConfig(rank=2, targets="up")
  for given in (named, "fsdp"):
    model = Sharded(nnx.Rngs(0))
    if hasattr(model.up, "set_metadata"):
      model.up.set_metadata(out_sharding=given)
    else:
      model.up = nnx.Param(model.up.value, sharding=given)
    if given != named:
      with pytest.raises(ValueError, match=r"kernel 'up' has sharding "
                         r"metadata .*'fsdp'; expected a tuple"):
        ljn.apply_lora(model, config, jax.random.key(1), x)
      continue
    m = ljn.apply_lora(model, config, jax.random.key(1), x)
    for name in ("a", "b"):
      assert getattr(m.lora.up, name).get_metadata()["mesh"] is mesh
    assert spec_names(nnx.state(m, nnx.LoRAParam)) == {
        "lora/up/a": ("fsdp", None), "lora/up/b": (None, "tp")}
    ljn.set_delta(m, randomize(ljn.get_delta(m), scale=0.5))
    np.testing.assert_allclose(m(x), ljn.merge(m)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(nnx.Param(jnp.zeros(())), "set_metadata"),
                    reason="flax 0.11 has no sharding_rules metadata")
def test_factors_take_the_kernels_logical_names_and_rules():
  """Logical axis names with the kernel's own ``sharding_rules`` (flax
  0.12): the factors keep the logical names and the rules, so
  ``nnx.get_partition_spec`` maps them to the mesh's axes as it maps the
  kernel's."""
  model = Sharded(nnx.Rngs(0))
  model.up.set_metadata(out_sharding=("embed", "mlp"),
                        sharding_rules=(("embed", "fsdp"), ("mlp", "tp")))
  x = jax.random.normal(jax.random.key(2), (4, 3, D))
  m = ljn.apply_lora(model, lj.LoraConfig(rank=2, targets="up"),
                     jax.random.key(1), x)
  assert spec_names(nnx.state(m, nnx.LoRAParam)) == {
      "lora/up/a": ("fsdp", None), "lora/up/b": (None, "tp")}
  assert tuple(nnx.get_partition_spec(model.up).value) == ("fsdp", "tp")
