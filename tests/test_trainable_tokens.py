"""Trainable tokens (LoraConfig.trainable_tokens): only the chosen rows of an
embedding table train; merge, both engines, a tied head, unmerge,
save/load and lj.optimizer all see the same rows."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

VOCAB, DIM = 37, 8
IDS = (5, 30, 2)
TOKENS = jnp.array([[1, 5, 7, 5, 30], [2, 0, 36, 30, 4]])


def model(p, ids):
  """An embedding lookup, a dense layer and a tied output head."""
  h = jnp.tanh(jnp.take(p["embed"], ids, axis=0) @ p["fc"]["kernel"])
  return h @ p["embed"].T


def _params(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"embed": jax.random.normal(k1, (VOCAB, DIM)).astype(dtype),
          "fc": {"kernel": jax.random.normal(k2, (DIM, DIM)) / 3}}


CONFIG = lj.LoraConfig(rank=2, targets="fc/kernel",
                       trainable_tokens={"embed": list(IDS)})


@pytest.fixture(scope="module")
def setup():
  params = _params()
  base, delta = lj.split(params, CONFIG, jax.random.key(1))
  # "trained": new rows and a non-zero b
  key = jax.random.key(2)
  delta["embed"] = delta["embed"].replace(
      values=delta["embed"].values + jax.random.normal(key, (3, DIM)))
  delta["fc"]["kernel"] = delta["fc"]["kernel"].replace(
      b=jnp.full((2, DIM), 0.1))
  return params, base, delta


def test_split_makes_rows_of_the_table(setup):
  params, base, delta = setup
  _, fresh = lj.split(params, CONFIG, jax.random.key(1))
  t = fresh["embed"]
  assert isinstance(t, lj.TrainableTokens)
  assert t.indices == IDS and t.vocab == VOCAB and base is params
  np.testing.assert_array_equal(t.values, np.asarray(params["embed"])[
      list(IDS)])
  # at init the model is unchanged
  merged = lj.merge(params, {"embed": t})
  np.testing.assert_array_equal(merged["embed"], params["embed"])


def test_merge_sets_only_those_rows(setup):
  params, base, delta = setup
  table = np.asarray(lj.merge(base, delta)["embed"])
  want = np.asarray(params["embed"]).copy()
  want[list(IDS)] = np.asarray(delta["embed"].values)
  np.testing.assert_array_equal(table, want)


def test_engines_and_tied_head_match_merge(setup):
  params, base, delta = setup
  ref = model(lj.merge(base, delta), TOKENS)
  # the tied head reads the new rows: logit of token 5 is h . values[0]
  merged = lj.merge(base, delta)
  h = jnp.tanh(merged["embed"][TOKENS] @ merged["fc"]["kernel"])
  np.testing.assert_allclose(ref[..., 5], h @ delta["embed"].values[0],
                             rtol=1e-5, atol=1e-5)
  for mode in ("merge", "factored"):
    np.testing.assert_allclose(jax.jit(lj.wrap(model, mode))(base, delta,
                                                             TOKENS), ref,
                               rtol=1e-5, atol=1e-5)
  report = lj.explain(model, base, delta, TOKENS, mode="factored")
  assert report.rules["embed"] == ["gather", "dot_general (transposed use)"]
  assert not report.fallbacks


def _loss(mode):
  return lambda base, d: jnp.sum(jnp.sin(lj.wrap(model, mode)(base, d,
                                                               TOKENS)))


@pytest.fixture(scope="module")
def grads(setup):
  """``{mode: (gradient of the delta, optimised HLO of the step)}``."""
  _, base, delta = setup
  out = {}
  for mode in ("merge", "factored"):
    step = jax.jit(jax.grad(_loss(mode), argnums=1)).lower(base, delta
                                                           ).compile()
    out[mode] = (step(base, delta), step.as_text())
  return out


def test_gradients_match_merge_without_a_table_gradient(grads):
  g_merge, g_fact = grads["merge"][0], grads["factored"][0]
  for gm, gf in zip(jax.tree.leaves(g_merge), jax.tree.leaves(g_fact)):
    np.testing.assert_allclose(gf, gm, rtol=1e-4, atol=1e-5)
  assert g_fact["embed"].values.shape == (3, DIM)
  assert float(jnp.abs(g_fact["embed"].values).max()) > 1e-3
  # No instruction of the compiled factored step computes a (vocab, dim)
  # array (the table is read, never rebuilt or differentiated); the merge
  # engine's step does (the control that the check can see one).
  produced = lambda mode: [
      line for line in grads[mode][1].splitlines()
      if re.search(rf"= f32\[{VOCAB},{DIM}\]", line)
      and "parameter(" not in line]
  assert not produced("factored")
  assert produced("merge")


def test_unmerge_restores_the_rows(setup):
  params, base, delta = setup
  norms = lj.dora_norms(base, delta)
  np.testing.assert_array_equal(norms["embed"],
                                np.asarray(params["embed"])[list(IDS)])
  back = lj.unmerge(lj.merge(base, delta), delta, norms)
  np.testing.assert_array_equal(back["embed"], params["embed"])
  with pytest.raises(ValueError, match=r"'embed' holds trainable tokens.*"
                     r"dora_norms\(base, delta\)"):
    lj.unmerge(lj.merge(base, delta), delta)


def test_save_and_load(setup, tmp_path):
  _, base, delta = setup
  path = lj.save(os.path.join(tmp_path, "a"), delta, CONFIG)
  restored = lj.load(path)
  assert restored["embed"].indices == IDS
  np.testing.assert_array_equal(restored["embed"].values, delta["embed"].values)
  assert lj.load_config(path) == CONFIG
  assert lj.load_metadata(path)["format_version"] == 2
  np.testing.assert_array_equal(lj.merge(base, restored)["embed"],
                                lj.merge(base, delta)["embed"])
  # tokens alone
  only = lj.load(lj.save(os.path.join(tmp_path, "b"), {"embed": delta["embed"]}))
  assert set(only) == {"embed"}


def test_optimizer_trains_the_rows(setup, grads):
  _, base, delta = setup
  tx = lj.optimizer(optax.adam(0.1))
  state = tx.init((base, delta))
  grads = (jax.tree.map(jnp.zeros_like, base), grads["factored"][0])
  updates, _ = jax.jit(tx.update)(grads, state, (base, delta))
  new_base, new_delta = optax.apply_updates((base, delta), updates)
  np.testing.assert_array_equal(new_base["embed"], base["embed"])
  step = np.asarray(new_delta["embed"].values - delta["embed"].values)
  # Adam's first step moves every entry with a non-zero gradient by lr
  g = np.asarray(grads[1]["embed"].values)
  np.testing.assert_allclose(np.abs(step)[g != 0], 0.1, rtol=1e-4)


def test_bf16_table():
  params = _params(jnp.bfloat16)
  base, delta = lj.split(params, CONFIG, jax.random.key(1))
  assert delta["embed"].values.dtype == jnp.float32
  delta["embed"] = delta["embed"].replace(values=delta["embed"].values + 0.3)
  merged = lj.merge(base, delta)
  assert merged["embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(merged["embed"][jnp.array(IDS)], np.float32),
      np.asarray(delta["embed"].values.astype(jnp.bfloat16), np.float32))
  ref = jax.jit(lj.wrap(model, "merge"))(base, delta, TOKENS)
  out = jax.jit(lj.wrap(model, "factored"))(base, delta, TOKENS)
  # the factored engine adds (values - rows) to the bf16 rows: one rounding
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(ref, np.float32), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("tokens, match", [
    ({"emb": [1]}, r"trainable_tokens: the regex 'emb' matches no leaf"),
    ({"fc/kernel": [1]}, r"trainable_tokens.*'fc/kernel'.*not a 2-D float "
                         r"embedding table|'fc/kernel' is selected both"),
    ({"embed": [3, 37]}, r"'embed'.*token ids \[37\] are out of range for a "
                         r"table of 37 rows"),
])
def test_errors_name_the_leaf(tokens, match):
  cfg = lj.LoraConfig(rank=2, targets="fc/kernel", trainable_tokens=tokens)
  with pytest.raises(ValueError, match=match):
    lj.split(_params(), cfg, jax.random.key(0))


def test_more_errors(setup):
  params, base, delta = setup
  with pytest.raises(ValueError, match=r"token ids \[3\] more than once"):
    lj.LoraConfig(trainable_tokens={"embed": [3, 1, 3]})
  one_d = {"embed": jnp.ones(VOCAB), "fc": params["fc"]}
  with pytest.raises(ValueError, match=r"'embed' \(shape \(37,\).*not a 2-D"):
    lj.split(one_d, CONFIG, jax.random.key(0))
  with pytest.raises(ValueError, match=r"'embed' is selected both for a LoRA"):
    lj.split(params, lj.LoraConfig(rank=2, targets="embed|fc/kernel",
                                   trainable_tokens={"embed": [1]}),
             jax.random.key(0))
  with pytest.raises(ValueError, match="out of range"):
    lj.TrainableTokens(jnp.ones((1, DIM)), (VOCAB,), VOCAB)
  with pytest.raises(ValueError, match="tokens belong to a table of shape"):
    lj.merge({"embed": jnp.ones((VOCAB + 1, DIM))}, {"embed": delta["embed"]})
  with pytest.raises(ValueError, match="holds trainable tokens"):
    lj.stack([delta, delta])
  # ids as a jax array (as a tokenizer may give them) act as the same list;
  # traced ids cannot configure anything
  assert lj.LoraConfig(trainable_tokens={"embed": jnp.array([[4], [1]])}) \
      == lj.LoraConfig(trainable_tokens={"embed": [4, 1]})
  with pytest.raises(TypeError, match=r"trainable_tokens\['embed'\].*concrete"):
    jax.jit(lambda ids: lj.LoraConfig(trainable_tokens={"embed": ids}))(
        jnp.array([1, 2]))
  # tokens alone: no LoRA target needed
  _, only = lj.split(params, lj.LoraConfig(targets="fc/kernel",
                                           exclude="fc/kernel",
                                           trainable_tokens={"embed": [1]}),
                     jax.random.key(0))
  assert lj.adapters(only) == {} and only["embed"].indices == (1,)


def test_a_non_finite_row(setup):
  params, base, delta = setup
  bad = dict(delta, embed=delta["embed"].replace(
      values=delta["embed"].values.at[1, 3].set(jnp.nan)))
  # merge keeps the NaN to token 30's row (and its logit column)
  out = jax.jit(lj.wrap(model, "merge"))(base, bad, TOKENS[:, :2])  # 1, 5
  assert np.isfinite(np.delete(np.asarray(out), 30, axis=-1)).all()
  # the factored engine would spread it (0 * nan in the one-hot product):
  # refused eagerly, naming the table and the token
  with pytest.raises(ValueError, match=r"'embed'.*token ids \[30\] hold NaN"):
    lj.wrap(model, "factored")(base, bad, TOKENS)
  # under jit: NaN, never a finite value
  out = jax.jit(lj.wrap(model, "factored"))(base, bad, TOKENS[:, :2])
  assert np.isnan(np.asarray(out)).all()


def test_summary_counts_the_rows(setup):
  _, base, delta = setup
  text = lj.summary(base, delta)
  # 3 rows of 8, and the fc adapter's 2 * (8 * 2)
  assert text.splitlines()[0].startswith(f"trainable {3 * DIM + 32} ")
  assert re.search(r"embed +\(37, 8\) +3 tokens +24$", text, re.M)
  assert re.search(r"embed +table \(37, 8\) +3 trainable tokens +ids \[5, "
                   r"30, 2\] +values f32\[3,8\]", lj.describe(delta))


def test_a_non_finite_base_row_under_a_token(setup):
  # merge overwrites the table's rows at the ids, so a NaN there (a resized
  # vocabulary's uninitialised rows) never reaches its outputs; the factored
  # engine's b = values - rows would spread it to every token
  params, base, delta = setup
  bad = dict(base, embed=base["embed"].at[30].set(jnp.nan))
  ref = model(lj.merge(bad, delta), TOKENS)
  assert np.isfinite(np.asarray(ref)).all()
  with pytest.raises(ValueError, match=r"'embed'.*own rows of token ids "
                     r"\[30\] hold NaN.*set\(0\)"):
    lj.wrap(model, "factored")(bad, delta, TOKENS)
  # the remedy leaves the merged model as it was
  fixed = dict(bad, embed=bad["embed"].at[jnp.array([30])].set(0))
  np.testing.assert_array_equal(model(lj.merge(fixed, delta), TOKENS), ref)


def test_a_transposed_table_gathered_by_column(setup):
  # table.T[:, ids] and jnp.take(table.T, ids, axis=1) (a (dim, vocab) view):
  # the factored lookup gathered from a (vocab, r) along the wrong axis
  # (wrong rows in bounds, NaN with take's fill), for tokens and a LoRA
  # adapter on the table alike
  params, base, delta = setup
  lbase, ldelta = lj.split(params, lj.LoraConfig(rank=2, targets="embed"),
                           jax.random.key(3))
  ldelta["embed"] = ldelta["embed"].replace(b=jnp.full((2, DIM), 0.3))
  for b, d, f in ((base, delta, lambda p, t: p["embed"].T[:, t]),
                  (lbase, ldelta,
                   lambda p, t: jnp.take(p["embed"].T, t, axis=1))):
    @jax.jit
    def both(d, b=b, f=f):
      loss = lambda d, mode: jnp.sum(jnp.sin(lj.wrap(f, mode)(b, d, TOKENS)))
      return [(lj.wrap(f, m)(b, d, TOKENS), jax.grad(loss)(d, m))
              for m in ("factored", "merge")]
    got, want = both(d)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_merge_and_unmerge_on_an_explicit_vocab_sharded_table(setup):
  # Under Explicit mesh axes JAX asks every gather / scatter on a sharded
  # table for its out_sharding: merge, dora_norms and unmerge raised a
  # ShardingTypeError from inside lora_jax; now the rows keep the table's
  # feature sharding and the merged table its own
  from helpers import make_mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from sharding_helpers import set_mesh
  _, base, delta = setup
  base = dict(base, embed=jnp.concatenate([base["embed"]] * 2)[:36])
  delta = dict(delta, embed=delta["embed"].replace(vocab=36))
  mesh = make_mesh((2, 2), explicit=("data", "model"))
  want = lj.merge(base, delta)["embed"]
  with set_mesh(mesh):
    table = jax.device_put(base["embed"], NamedSharding(mesh, P(
        "model", "data")))
    sharded = dict(base, embed=table)
    norms = lj.dora_norms(sharded, delta)
    merged = jax.jit(lj.merge)(sharded, delta)
    back = lj.unmerge(merged, delta, norms)
  np.testing.assert_array_equal(merged["embed"], want)
  assert merged["embed"].sharding.spec == P("model", "data")
  np.testing.assert_array_equal(back["embed"], base["embed"])
