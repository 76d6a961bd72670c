"""lj.eva_init (EVA): each adapter's a from the principal directions of its
kernel's inputs, ranks redistributed by explained variance; checked against
numpy's SVD of the same activations, collected by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

K1 = jax.random.split(jax.random.key(0), 4)
PARAMS = {"w1": jax.random.normal(K1[0], (8, 12)) / 3,
          "w2": jax.random.normal(K1[1], (12, 6)) / 3}
# one dominant input direction: w1 keeps 1 of its 2, w2 gets 3
SCALES = jnp.array([5.0, 1, 1, 1, 1, 1, 1, 1])
BATCHES = [jax.random.normal(jax.random.key(10 + i), (2, 5, 8)) * SCALES
           for i in range(3)]
RANK, RHO = 2, 2.0


def model(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _numpy_eva(rows_by_kernel, ranks, rho, whiten=False):
  """PEFT's EVA on the collected rows, in numpy: {path: a (in, k) or None}."""
  pcas, offers = {}, []
  for order, (p, rows) in enumerate(rows_by_kernel.items()):
    centered = rows - rows.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    ratio = s ** 2 / np.sum(s ** 2)
    pcas[p] = (s, vt)
    offers += [(-r, order, j) for j, r in enumerate(ratio[:round(ranks[p]
                                                                * rho)])]
  kept = sorted(offers)[:sum(ranks.values())]
  paths = list(rows_by_kernel)
  counts = {p: sum(1 for _, o, _ in kept if paths[o] == p) for p in paths}
  out = {}
  for p, k in counts.items():
    s, vt = pcas[p]
    a = vt[:k].T
    out[p] = None if k == 0 else (a / np.sqrt(s[:k]) if whiten else a)
  return out


def _rows():
  xs = np.concatenate([np.asarray(b).reshape(-1, 8) for b in BATCHES])
  hs = np.tanh(xs @ np.asarray(PARAMS["w1"], np.float64))
  return {"w1": xs.astype(np.float64), "w2": hs}


def _same_directions(a, ref):
  # each column up to its sign
  signs = np.sign(np.sum(a * ref, axis=0))
  np.testing.assert_allclose(a * signs, ref, atol=2e-4)


@pytest.mark.parametrize("whiten", [False, True])
def test_directions_and_ranks_match_numpy(whiten):
  base, delta = lj.split(PARAMS, lj.LoraConfig(rank=RANK, targets="w."),
                         jax.random.key(1))
  new = lj.eva_init(base, delta, model, BATCHES, rho=RHO, whiten=whiten)
  ref = _numpy_eva(_rows(), {"w1": RANK, "w2": RANK}, RHO, whiten)
  got = {p: None if d is None else d.a for p, d in new.items()}
  assert {p: None if a is None else a.shape[1] for p, a in got.items()} == {
      p: None if a is None else a.shape[1] for p, a in ref.items()}
  assert new["w1"].rank == 1 and new["w2"].rank == 3  # redistributed
  for p, a in ref.items():
    if a is not None:
      _same_directions(np.asarray(got[p]), a)
      np.testing.assert_array_equal(new[p].b, 0)
      assert new[p].scale == delta[p].scale
  # b = 0: the model is unchanged, in both engines
  x = BATCHES[0]
  for mode in ("merge", "factored"):
    np.testing.assert_allclose(lj.wrap(model, mode)(base, new, x),
                               model(PARAMS, x), atol=1e-6)


def test_inputs_inside_scan_and_jit_and_a_kernel_losing_its_rank():
  # w1 read inside a scan over time and a jit; w2's input is constant
  # (no variance): its directions explain nothing and its rank goes to w1.
  @jax.jit
  def step(w, x):
    return jnp.tanh(x @ w)

  def f(p, x):
    _, hs = jax.lax.scan(lambda c, xt: (c, step(p["w1"], xt)), 0.0,
                         jnp.swapaxes(x, 0, 1))
    return hs.sum() + jnp.ones((3, 12)) @ p["w2"]
  base, delta = lj.split(PARAMS, lj.LoraConfig(rank=RANK, targets="w."),
                         jax.random.key(1))
  new = lj.eva_init(base, delta, f, BATCHES, rho=RHO)
  assert new["w2"] is None and new["w1"].rank == 2 * RANK
  ref = _numpy_eva({"w1": _rows()["w1"]}, {"w1": 2 * RANK}, 1.0)
  _same_directions(np.asarray(new["w1"].a), ref["w1"])


def test_errors():
  base, delta = lj.split(PARAMS, lj.LoraConfig(rank=RANK, targets="w."),
                         jax.random.key(1))
  with pytest.raises(ValueError, match="batches is empty"):
    lj.eva_init(base, delta, model, [])
  with pytest.raises(ValueError, match="rho must be a number >= 1"):
    lj.eva_init(base, delta, model, BATCHES, rho=0.5)
  with pytest.raises(ValueError, match=r"no input of \['w2'\] was seen"):
    lj.eva_init(base, delta, lambda p, x: x @ p["w1"], BATCHES)
  stacked = {"w": jnp.ones((2, 8, 4))}
  b3, d3 = lj.split(stacked, lj.LoraConfig(rank=1, targets="w", layouts={
      "w": lj.Layout((0,), (1,), (2,))}), jax.random.key(0))
  with pytest.raises(ValueError, match=r"'w' has batch axes \(0,\)"):
    lj.eva_init(b3, d3, lambda p, x: jnp.einsum("bi,lio->lbo", x, p["w"]),
                [jnp.ones((3, 8))])


def test_trainable_tokens_are_part_of_the_model():
  # the activations are the model's with the tokens' rows (here w1's input
  # is the embedding of token 1, whose row the tokens replace)
  params = {"embed": jnp.zeros((4, 8)), **PARAMS}
  g = lambda p, ids: model(p, jnp.take(p["embed"], ids, axis=0))
  base, delta = lj.split(params, lj.LoraConfig(
      rank=RANK, targets="w.", trainable_tokens={"embed": [1]}),
      jax.random.key(1))
  rows = jnp.stack([BATCHES[0][0, 0], jnp.zeros(8)])
  delta["embed"] = delta["embed"].replace(values=rows[:1])
  new = lj.eva_init(base, delta, g, [jnp.array([1, 0])], rho=1.0)
  assert new["embed"] is delta["embed"]
  # w1 saw two rows, the token's new one and a zero row: one direction
  ref = _numpy_eva({"w1": np.asarray(rows, np.float64)}, {"w1": 2}, 1.0)
  _same_directions(np.asarray(new["w1"].a[:, :1]), ref["w1"][:, :1])


def test_input_contracted_on_its_first_axis():
  # x (features, tokens) contracted on axis 0: the rows are x's columns
  f = lambda p, xt: jnp.einsum("it,io->to", xt, p["w1"]) @ p["w2"]
  base, delta = lj.split(PARAMS, lj.LoraConfig(rank=RANK, targets="w1"),
                         jax.random.key(1))
  xts = [jnp.swapaxes(b.reshape(-1, 8), 0, 1) for b in BATCHES]
  new = lj.eva_init(base, delta, f, xts, rho=1.0)
  ref = _numpy_eva({"w1": _rows()["w1"]}, {"w1": RANK}, 1.0)
  _same_directions(np.asarray(new["w1"].a), ref["w1"])


@pytest.mark.parametrize("shape", [(8, 4), (8, 8)])
def test_a_transposed_use_is_refused(shape):
  # h @ W.T (a tied head) contracts h with W's outputs: its directions are
  # not the inputs a multiplies; a square W passes every shape check
  params = {"w": jnp.ones(shape)}
  base, delta = lj.split(params, lj.LoraConfig(rank=1, targets="w"),
                         jax.random.key(0))
  h = jnp.ones((3, shape[1]))
  tied = lambda p, x: (x @ p["w"]).sum() + (h @ p["w"].T).sum()
  with pytest.raises(ValueError, match=r"'w' is used transposed"):
    lj.eva_init(base, delta, tied, [jnp.ones((3, 8))])


def test_a_non_finite_input_names_the_kernel():
  base, delta = lj.split(PARAMS, lj.LoraConfig(rank=RANK, targets="w."),
                         jax.random.key(1))
  bad = [BATCHES[0].at[0, 0, 2].set(jnp.nan)]
  with pytest.raises(ValueError, match=r"inputs of \['w1', 'w2'\] hold NaN"):
    lj.eva_init(base, delta, model, bad)
