"""lora_jax.nnx inside google/tunix 0.1.7: its Qwen3 and Gemma3 models, its
``PeftTrainer`` and its ``Sampler``, used as they are.

Tiny configs (2 layers, d=32, vocab 64) with random weights: Qwen3 in float32,
Gemma3 in bfloat16 (its default ``param_dtype``; its config has no ``dtype``,
so tunix's sampler takes the KV-cache dtype from the model's first variable).
LoRA rank 4 on q/k/v/o and gate/up/down of every layer.

tunix is a test-only extra (``lora_jax[tunix]`` plus ``google-tunix`` with
``--no-deps``, see ci/leg.sh); without it these tests skip, except where
``LORA_JAX_TUNIX=1`` (the py313 CI leg), where they fail.
"""

import functools
import importlib.metadata
import os
import re

from flax import nnx
from helpers import spec_names
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
import lora_jax.nnx as ljn

TUNIX_REASON = ("tunix tests run on the py313 CI leg (LORA_JAX_TUNIX=1, "
                "lora_jax[tunix] + google-tunix==0.1.7 --no-deps)")
TARGETS = (r"layers/\d+/attn/(q_proj|k_proj|v_proj|o_proj|q_einsum|kv_einsum|"
           r"attn_vec_einsum)/w|layers/\d+/mlp/(gate_proj|up_proj|down_proj)/kernel")
STEPS = 3
LR = 1e-2


@pytest.fixture(scope="module")
def tx():
  """tunix's modules, or a skip (a failure with LORA_JAX_TUNIX=1, where CI
  promises to run these tests)."""
  try:
    from tunix.generate import sampler
    from tunix.models.gemma3 import model as gemma3
    from tunix.models.qwen3 import model as qwen3
    from tunix.sft import peft_trainer
    from tunix.sft import utils
  except ImportError as e:
    if os.environ.get("LORA_JAX_TUNIX") == "1":
      pytest.fail(f"LORA_JAX_TUNIX=1 but {e}: install lora_jax[tunix] and "
                  f"google-tunix==0.1.7 --no-deps (ci/leg.sh).")
    pytest.skip(TUNIX_REASON)
  return dict(sampler=sampler, gemma3=gemma3, qwen3=qwen3,
              peft_trainer=peft_trainer, utils=utils)


class Tokenizer:
  """What tunix's TokenizerAdapter accepts: ids written as numbers."""

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 1

  def eos_id(self):
    return 2

  def pad_id(self):
    return 0


def _randomize(model, key):
  """Random weights in place (Gemma3 initialises its MLP to zeros): matrices
  N(0, 0.3^2), vectors (norm scales) their init + N(0, 0.1^2)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  new = [(0.3 * jax.random.normal(k, x.shape, jnp.float32) if x.ndim >= 2 else
          x.astype(jnp.float32) + 0.1 * jax.random.normal(k, x.shape)).astype(x.dtype)
         for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


def _build(tx, family):
  if family == "qwen3":
    q = tx["qwen3"]
    config = q.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32,
                           hidden_dim=64, num_heads=4, head_dim=8,
                           num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)
    return _randomize(q.Qwen3(config, rngs=nnx.Rngs(0)), jax.random.key(10))
  g = tx["gemma3"]
  config = g.ModelConfig(num_layers=2, num_embed=64, embed_dim=32,
                         hidden_dim=64, num_heads=4, head_dim=8,
                         num_kv_heads=2, sliding_window_size=4,
                         param_dtype=jnp.bfloat16)
  return _randomize(g.Gemma3(config, rngs=nnx.Rngs(0)), jax.random.key(10))


def _inputs(tx, tokens):
  """tunix's model inputs for a batch without padding (what PeftTrainer's
  default loss takes)."""
  mask = jnp.ones_like(tokens, bool)
  return dict(input_tokens=tokens, input_mask=mask,
              positions=tx["utils"].build_positions_from_mask(mask),
              attention_mask=tx["utils"].make_causal_attn_mask(mask))


def _random_delta(delta, key):
  """Random factors in ``delta``'s structure: a nonzero b, so the adapters
  move the outputs."""
  is_d = lambda x: isinstance(x, lj.LoraDelta)
  leaves, treedef = jax.tree.flatten(delta, is_leaf=is_d)
  out = []
  for i, d in enumerate(leaves):
    if d is None:
      out.append(d)
      continue
    ka, kb = jax.random.split(jax.random.fold_in(key, i))
    out.append(d.replace(a=0.3 * jax.random.normal(ka, d.a.shape, d.a.dtype),
                         b=0.3 * jax.random.normal(kb, d.b.shape, d.b.dtype)))
  return jax.tree.unflatten(treedef, out)


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _close(x, y, dtype):
  """float32: rounding of the same math; bfloat16 weights: the merged
  kernel is rounded to bfloat16 once, the factored product is not, and
  activations are bfloat16 (measured: 1.1e-5 of logits up to 6.5 in float32,
  0.094-0.12, 1.5-2 bfloat16 ulps, of logits up to 8.75 in bfloat16)."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  scale = max(1.0, float(np.abs(y).max()))
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(x, y, rtol=0, atol=tol * scale)


FAMILIES = ["qwen3", "gemma3"]
_DTYPE = {"qwen3": jnp.float32, "gemma3": jnp.bfloat16}


class Family:
  """One family's tiny model, its adapted module and what several tests
  share (built once per module)."""

  def __init__(self, tx, family):
    self.family, self.dtype = family, _DTYPE[family]
    self.model = _build(tx, family)
    self.before = _bits(nnx.state(self.model))
    self.tokens = jax.random.randint(jax.random.key(1), (4, 12), 3, 64)
    self.inputs = _inputs(tx, self.tokens)
    i = self.inputs
    self.example = (self.tokens, i["positions"], None, i["attention_mask"])
    # all-linear (the default): the seven projections, not the embedding
    self.config = lj.LoraConfig(rank=4, alpha=8.0)
    self.m = ljn.apply_lora(self.model, self.config, jax.random.key(2),
                            *self.example)
    self.delta0 = ljn.get_delta(self.m)

  def fresh(self, key=2):
    return ljn.apply_lora(self.model, self.config, jax.random.key(key),
                          *self.example)

  def logits(self, model):
    return model(*self.example)[0]

  def with_weights(self, params):
    """The original class with ``params`` as its weights."""
    graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)
    return nnx.merge(graphdef, params, jax.tree.map(jnp.copy, rest))


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tx):
  return Family(tx, request.param)


def _trainer(tx, m, ckpt):
  pt = tx["peft_trainer"]
  trainer = pt.PeftTrainer(m, optax.adam(LR), pt.TrainingConfig(
      eval_every_n_steps=1_000, checkpoint_root_directory=ckpt))
  return trainer.with_gen_model_input_fn(functools.partial(_inputs, tx))


@pytest.fixture(scope="module")
def trained(fam, tx, tmp_path_factory):
  """The adapted module trained STEPS steps by tunix's PeftTrainer (Adam,
  checkpointing into a folder), and the same steps through a functional
  lj.wrap loop."""
  pt = tx["peft_trainer"]
  m = fam.fresh()
  frozen = _bits(nnx.state(m, nnx.Not(nnx.LoRAParam)))
  lora0 = {p: np.array(x) for p, x in  # copies: the state shares m's storage
           lj.leaves_with_paths(nnx.state(m, nnx.LoRAParam))}
  assert tx["utils"].is_lora_enabled(m)
  ckpt = str(tmp_path_factory.mktemp(f"tunix_ckpt_{fam.family}"))
  trainer = _trainer(tx, m, ckpt)
  trainer.train([fam.tokens] * STEPS)  # trains until the data ends
  losses = np.asarray(trainer.metrics_logger.get_metric_history(
      "", "loss", "train"))

  # The same steps, functional: lj.wrap of the pure model, tunix's loss.
  graphdef, base, rest = nnx.split(fam.model, nnx.Param, ...)

  def f(p, tokens, positions, attention_mask):
    return nnx.merge(graphdef, p, rest)(tokens, positions, None,
                                         attention_mask)[0]

  wrapped = lj.wrap(f)
  opt = optax.adam(LR)

  @jax.jit
  def step(delta, state, inputs):
    def loss(d):
      model = lambda t, pos, _, mask: (wrapped(base, d, t, pos, mask), None)
      return pt._default_loss_fn(model, **inputs)
    value, g = jax.value_and_grad(loss)(delta)
    updates, state = opt.update(g, state, delta)
    return optax.apply_updates(delta, updates), state, value

  delta = ljn.get_delta(fam.fresh())
  state = opt.init(delta)
  func_losses = []
  for _ in range(STEPS):
    delta, state, value = step(delta, state, fam.inputs)
    func_losses.append(float(value))
  return dict(m=m, frozen=frozen, lora0=lora0, losses=losses, ckpt=ckpt,
              optimizer=trainer.optimizer,
              func_delta=delta, func_losses=np.asarray(func_losses),
              final=float(step(delta, state, fam.inputs)[2]))


def test_tunix_is_installed_where_promised(tx):
  assert importlib.metadata.version("google-tunix") == "0.1.7"
  assert tx["qwen3"].Qwen3 and tx["gemma3"].Gemma3


def test_structure(fam, tx):
  m, model = fam.m, fam.model
  assert _bits(nnx.state(model)) == fam.before, "apply_lora changed its input"
  assert type(m).__name__ == f"Lora{type(model).__name__}"
  assert m.config is model.config
  # the LoRAParam leaves are exactly a and b of each adapter, nothing else
  lora = {p for p, _ in lj.leaves_with_paths(nnx.state(m, nnx.LoRAParam))}
  adapted = set(lj.adapters(fam.delta0))
  # 2 layers x q/k/v/o/gate/up/down (Gemma3: k and v in one kv_einsum)
  assert len(adapted) == (14 if fam.family == "qwen3" else 12), sorted(adapted)
  assert all(re.fullmatch(TARGETS, p) for p in adapted), sorted(adapted)
  assert lora == {f"lora/{p}/{f}" for p in adapted for f in ("a", "b")}
  # every frozen weight is a Param, none a LoRAParam
  params = {p for p, _ in lj.leaves_with_paths(nnx.state(m, nnx.Param))}
  assert params - lora == {
      f"base_model/{p}" for p, _ in lj.leaves_with_paths(nnx.state(model, nnx.Param))}
  # what tunix's sampler takes the KV-cache dtype from (Gemma3's config has
  # no dtype): the model's first variable, never a float32 factor
  first = jax.tree.leaves(nnx.variables(m), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  assert jnp.dtype(first.dtype) == jnp.dtype(fam.dtype)


def test_forward_equals_merged(fam, tx):
  m = fam.fresh(key=3)
  delta = _random_delta(ljn.get_delta(m), jax.random.key(4))
  ljn.set_delta(m, delta)
  y = fam.logits(m)
  plain = ljn.merge(m)
  assert type(plain) is type(fam.model)
  assert not tx["utils"].is_lora_enabled(plain)
  _, base, _ = nnx.split(fam.model, nnx.Param, ...)
  by_lj = fam.with_weights(lj.merge(base, delta))
  y_merged, y_lj, y0 = fam.logits(plain), fam.logits(by_lj), fam.logits(fam.model)
  _close(y, y_merged, fam.dtype)
  _close(y, y_lj, fam.dtype)
  np.testing.assert_array_equal(np.asarray(y_merged), np.asarray(y_lj))
  # the adapters do move the logits (far beyond the tolerance)
  assert float(jnp.abs(y - y0).max()) > 0.3 * max(1.0, float(jnp.abs(y0).max()))


def test_peft_trainer_trains_only_the_factors(fam, trained):
  m = trained["m"]
  losses = trained["losses"]
  assert losses.shape == (STEPS,)
  assert np.all(np.diff(losses) < 0), losses
  assert trained["final"] < losses[0]
  # frozen weights (and every other non-LoRAParam variable) bitwise equal
  assert _bits(nnx.state(m, nnx.Not(nnx.LoRAParam))) == trained["frozen"]
  # every factor moved (b from zero, a once b is nonzero)
  now = dict(lj.leaves_with_paths(nnx.state(m, nnx.LoRAParam)))
  assert set(now) == set(trained["lora0"])
  for p, old in trained["lora0"].items():
    assert not np.array_equal(np.asarray(now[p]), old), p


def test_peft_trainer_equals_functional_wrap_loop(fam, trained):
  np.testing.assert_allclose(trained["losses"], trained["func_losses"],
                             rtol=1e-5 if fam.dtype == jnp.float32 else 1e-3)
  got = lj.adapters(ljn.get_delta(trained["m"]))
  want = lj.adapters(trained["func_delta"])
  assert set(got) == set(want)
  # Adam moves each factor by about LR a step; the two programs round the
  # same math differently (by 4e-7 here in float32)
  tol = 1e-4 if fam.dtype == jnp.float32 else 1e-2
  for p, d in got.items():
    for name in ("a", "b"):
      x, y = getattr(d, name), getattr(want[p], name)
      assert x.dtype == y.dtype == jnp.float32, (p, name)
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0,
                                 atol=tol * LR * STEPS, err_msg=f"{p}/{name}")


def test_peft_trainer_checkpoint_restores_the_factors(fam, tx, trained):
  """tunix checkpoints nnx.state(m, nnx.LoRAParam) (and the optimiser's
  state); a new trainer on an untrained module restores the factors."""
  m = fam.fresh(key=9)
  trainer = _trainer(tx, m, trained["ckpt"])
  assert trainer.train_steps == STEPS
  assert _bits(nnx.state(m, nnx.LoRAParam)) == _bits(
      nnx.state(trained["m"], nnx.LoRAParam))
  assert _bits(nnx.state(m, nnx.Not(nnx.LoRAParam))) == trained["frozen"]
  trainer.close()


def _sample(tx, fam, model=None, sampler=None):
  """tunix's Sampler on ``model`` (or ``sampler``), greedy:
  ``(sampler, tokens, logits)``."""
  s = tx["sampler"]
  if sampler is None:
    sampler = s.Sampler(model, Tokenizer(), s.CacheConfig(
        cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8))
  # return_logits needs model.num_embed, which tunix's Qwen3 lacks
  logits = hasattr(fam.model, "num_embed")
  out = sampler(["5 6 7 8 9", "10 11"], max_generation_steps=8,
                max_prompt_length=8, return_logits=logits, eos_tokens=[63])
  return (sampler, np.asarray(out.tokens),
          [np.asarray(x) for x in out.logits] if logits else [])


def test_sampler_greedy_equals_merged_models(fam, tx, trained):
  m = trained["m"]
  plain = ljn.merge(m)
  # merge(m) is the original class loaded with lj.merge's weights, bitwise
  assert type(plain) is type(fam.model)
  _, base, _ = nnx.split(fam.model, nnx.Param, ...)
  assert _bits(nnx.state(plain, nnx.Param)) == _bits(
      lj.merge(base, ljn.get_delta(m)))
  _, want, want_logits = _sample(tx, fam, plain)
  # tunix's RL weight sync: the sampler of an untrained module, given the
  # trained LoRAParam state, generates what the merged model does
  sampler, before, before_logits = _sample(tx, fam, fam.fresh())
  assert sampler.dtype == fam.dtype  # KV cache in the model's dtype
  sampler.transformer_state = nnx.state(m, nnx.LoRAParam)
  _, got, got_logits = _sample(tx, fam, sampler=sampler)
  np.testing.assert_array_equal(got, want)
  # training changed the generation (Gemma3's greedy tokens stay; its
  # logits, which tunix returns for it, move)
  assert not np.array_equal(before, want) or any(
      np.abs(x - y).max() > 0.1 for x, y in zip(before_logits, want_logits))
  for x, y in zip(got_logits, want_logits):
    _close(x, y, fam.dtype)


def test_delta_round_trip_and_checkpoint(fam, tx, trained, tmp_path):
  m = trained["m"]
  delta = ljn.get_delta(m)
  lj.save(tmp_path / "adapter", delta, fam.config)
  loaded = lj.load(tmp_path / "adapter")
  other = fam.fresh(key=7)
  ljn.set_delta(other, loaded)
  assert _bits(nnx.state(other, nnx.LoRAParam)) == _bits(nnx.state(m, nnx.LoRAParam))
  np.testing.assert_array_equal(np.asarray(fam.logits(other)),
                                np.asarray(fam.logits(m)))
  # merge(m)'s weights are lj.merge's of the frozen base and get_delta(m)
  _, base, _ = nnx.split(fam.model, nnx.Param, ...)
  want = lj.merge(base, delta)
  got = nnx.state(ljn.merge(m), nnx.Param)
  assert _bits(got) == _bits(want)
  # a delta that does not fit is refused, naming the leaf
  bad = _random_delta(loaded, jax.random.key(5))
  p = next(iter(lj.adapters(bad)))
  with pytest.raises(ValueError, match="missing"):
    ljn.set_delta(other, {k: v for k, v in lj.adapters(bad).items() if k != p})


def test_factors_carry_tunix_sharding_metadata(fam, trained):
  """tunix declares how each kernel is sharded (its ``ShardingConfig``);
  each factor carries what ``lj.factor_specs`` derives from its kernel's
  names, and so does the state of PeftTrainer's optimizer, which the
  trainer shards by ``nnx.get_partition_spec``."""
  kernels = spec_names(nnx.state(fam.model, nnx.Param))
  factors = spec_names(nnx.state(fam.m, nnx.LoRAParam))
  adapted = lj.adapters(fam.delta0)
  assert any(any(kernels[p]) for p in adapted), "no sharding names to carry"
  for path, d in adapted.items():
    a, b, _ = lj.factor_specs(jax.sharding.PartitionSpec(*kernels[path]),
                              d.layout)
    assert factors[f"lora/{path}/a"] == tuple(a), path
    assert factors[f"lora/{path}/b"] == tuple(b), path
  opt = spec_names(nnx.state(trained["optimizer"], nnx.optimizer.OptState))
  moments = {k: v for k, v in opt.items() if "/lora/" in k}
  assert moments, sorted(opt)
  for k, v in moments.items():
    assert v == factors["lora/" + k.split("/lora/", 1)[1]], k
