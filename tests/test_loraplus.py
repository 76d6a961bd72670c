"""lj.loraplus: PEFT's LoRA+ groups (a at lr, b and 1-D leaves at lr * ratio,
embedding adapters at embedding_lr, loraplus_weight_decay), checked against
the update rules written out in numpy. Parity with PEFT's
create_loraplus_optimizer and torch's AdamW: tests/test_peft_merges.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax._src import loraplus as lp

LR, RATIO, EMB_LR = 0.1, 4.0, 0.01


def _tree():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  base = {"fc": {"kernel": f(3, 4), "bias": f(4)},
          "wte": {"embedding": f(5, 3)}, "norm": {"scale": f(4)}}
  delta = {"fc": {"kernel": lj.LoraDelta(f(3, 2), f(2, 4), magnitude=f(4)),
                  "bias": None},
           "wte": {"embedding": lj.LoraDelta(f(5, 2), f(2, 3))},
           "norm": {"scale": None}}
  return base, delta


def _rates(tree, pair=False):
  """The per-leaf learning rate PEFT's groups give, by hand."""
  rates = {"fc/kernel/a": LR, "fc/kernel/b": LR * RATIO,
           "fc/kernel/magnitude": LR * RATIO,
           "wte/embedding/a": EMB_LR, "wte/embedding/b": EMB_LR}
  if pair:
    rates = {"1/" + k: v for k, v in rates.items()}
    rates.update({"0/fc/bias": LR * RATIO, "0/norm/scale": LR * RATIO,
                  "0/fc/kernel": LR})
  return [rates.get(p) for p, _ in lj.leaves_with_paths(tree)]


def test_sgd_steps_at_each_groups_rate():
  _, delta = _tree()
  tx = lj.loraplus(optax.sgd, LR, RATIO, EMB_LR)
  grads = jax.tree.map(lambda x: x * 0 + 1.5, delta)
  updates, _ = jax.jit(tx.update)(grads, tx.init(delta), delta)
  for u, rate in zip(jax.tree.leaves(updates), _rates(delta)):
    np.testing.assert_array_equal(u, np.full(u.shape, -1.5 * rate, np.float32))


def test_adamw_step_with_peft_weight_decay_inside_lj_optimizer():
  # The pair (base, delta) through lj.optimizer: trained base leaves join the
  # groups (bias, norm scale: 1-D at lr*ratio; a base kernel at lr); weight
  # decay on every group but the 'bias' leaf. Two AdamW steps in numpy.
  base, delta = _tree()
  wd = 0.3
  tx = lj.optimizer(lj.loraplus(optax.adamw, LR, RATIO, EMB_LR,
                                loraplus_weight_decay=wd, b1=0.8, eps=1e-6),
                    trainable=r"fc/.*|norm/scale")
  params = (base, delta)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda x: jnp.asarray(
      rng.normal(size=x.shape), jnp.float32), params) for _ in range(2)]
  for g in grads:
    g[0]["wte"]["embedding"] *= 0  # frozen

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state
  for g in grads:
    params, state = step(params, state, g)
  paths = [p for p, _ in lj.leaves_with_paths((base, delta))]
  rates = _rates((base, delta), pair=True)
  assert rates.count(None) == 1  # the frozen table
  for path, rate, x0, got, *gs in zip(
      paths, rates, jax.tree.leaves((base, delta)), jax.tree.leaves(params),
      *(jax.tree.leaves(g) for g in grads)):
    x = np.asarray(x0, np.float64)
    if rate is None:
      assert path == "0/wte/embedding"
      np.testing.assert_array_equal(got, x0)
      continue
    decay = 0.0 if path.endswith("bias") else wd
    m = v = 0.0
    for t, g in enumerate(gs, 1):
      g = np.asarray(g, np.float64)
      m, v = 0.8 * m + 0.2 * g, 0.999 * v + 0.001 * g * g
      mhat, vhat = m / (1 - 0.8 ** t), v / (1 - 0.999 ** t)
      x = x - rate * (mhat / (np.sqrt(vhat) + 1e-6) + decay * x)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=2e-5, err_msg=path)


def test_groups_decay_as_peft_whatever_the_optimizers_default():
  # optax.adamw's own default decay (1e-4) is overridden by PEFT's 0; with
  # loraplus_weight_decay, only the 1-D 'bias' group is left undecayed.
  calls = []

  def adamw(**kw):
    calls.append((kw["learning_rate"], kw["weight_decay"], kw["b2"]))
    return optax.adamw(**kw)
  lj.loraplus(adamw, LR, RATIO, EMB_LR, b2=0.9)
  assert calls == [(LR, 0.0, 0.9), (LR * RATIO, 0.0, 0.9),
                   (LR * RATIO, 0.0, 0.9), (EMB_LR, 0.0, 0.9)]
  calls.clear()
  lj.loraplus(adamw, LR, RATIO, EMB_LR, loraplus_weight_decay=0.5, b2=0.9)
  assert calls == [(LR, 0.5, 0.9), (LR * RATIO, 0.5, 0.9),
                   (LR * RATIO, 0.0, 0.9), (EMB_LR, 0.5, 0.9)]


def test_schedules():
  _, delta = _tree()
  sched = lambda count: 0.1 * (count + 1)
  emb = lambda count: 0.01 * (count + 2)
  tx = lj.loraplus(optax.sgd, sched, 3.0, emb)
  state = tx.init(delta)
  ones = jax.tree.map(jnp.ones_like, delta)
  update = jax.jit(tx.update)
  for step in range(2):
    updates, state = update(ones, state, delta)
    u = lj.adapters(updates)
    np.testing.assert_allclose(u["fc/kernel"].a, -sched(step), rtol=1e-6)
    np.testing.assert_allclose(u["fc/kernel"].b, -3 * sched(step), rtol=1e-6)
    np.testing.assert_allclose(u["fc/kernel"].magnitude, -3 * sched(step),
                               rtol=1e-6)
    np.testing.assert_allclose(u["wte/embedding"].b, -emb(step), rtol=1e-6)


def test_embedding_selector():
  _, delta = _tree()
  labels = lambda **kw: {p: x for p, x in lj.leaves_with_paths(
      lp.loraplus_labels(delta, **kw))}
  assert labels()["wte/embedding/a"] == lp.EMBEDDING
  assert labels()["fc/kernel/a"] == lp.A
  assert labels()["fc/kernel/magnitude"] == lp.B
  none = labels(embeddings=None)
  assert none["wte/embedding/a"] == lp.A and none["wte/embedding/b"] == lp.B
  custom = labels(embeddings=lambda p, d: d.magnitude is not None)
  assert custom["fc/kernel/b"] == lp.EMBEDDING
  assert custom["fc/kernel/magnitude"] == lp.B  # 1-D: B, as PEFT
  assert labels(embeddings=[r"fc/kernel"])["fc/kernel/a"] == lp.EMBEDDING
  d = delta["fc"]["kernel"]
  assert [lp.is_embedding_adapter(p, d) for p in (
      "embedder/input_embedding", "embedding", "wte/embedding_2",
      "embedding/kernel")] == [True, True, False, False]
  # trainable token rows (n, dim): PEFT's trainable_tokens_delta is 2-D and
  # not a LoRA Embedding's, so it is in group A (lr, decayed)
  tokens = lp.loraplus_labels({"wte": {"embedding": lj.TrainableTokens(
      jnp.ones((1, 3)), (4,), vocab=6)}})
  assert jax.tree.leaves(tokens) == [lp.A]
  # a stack of adapters: each factor as a single adapter's
  stacked = {p: x for p, x in lj.leaves_with_paths(
      lp.loraplus_labels(lj.stack([delta, delta])))}
  assert stacked == labels()


def test_errors():
  with pytest.raises(ValueError, match=re.escape(
      "weight_decay in optimizer_kwargs; LoRA+ sets every group's "
      "weight_decay: give loraplus_weight_decay")):
    lj.loraplus(optax.adamw, 1e-3, weight_decay=0.1)
  with pytest.raises(ValueError, match=r"loraplus_weight_decay=0.1 but 'sgd' "
                     r"takes no weight_decay"):
    lj.loraplus(optax.sgd, 1e-3, loraplus_weight_decay=0.1)
  with pytest.raises(ValueError, match=r"ratio=-1.0; give a finite number"):
    lj.loraplus(optax.sgd, 1e-3, ratio=-1.0)
  with pytest.raises(ValueError, match=r"embedding_lr=nan"):
    lj.loraplus(optax.sgd, 1e-3, embedding_lr=float("nan"))
  with pytest.raises(ValueError, match=r"learning_rate='1e-3'"):
    lj.loraplus(optax.sgd, "1e-3")
  tx = lj.loraplus(optax.sgd, jnp.float32(0.5), ratio=np.float64(2.0))
  delta = {"w": lj.LoraDelta(jnp.ones((2, 1)), jnp.ones((1, 2)))}
  u, _ = tx.update(delta, tx.init(delta))
  assert float(u["w"].b[0, 0]) == -1.0  # jax / numpy scalars are numbers
  with pytest.raises(TypeError, match=r"not an instance"):
    lj.loraplus(optax.sgd(1e-3), 1e-3)
