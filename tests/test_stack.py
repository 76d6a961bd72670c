"""Many adapters on one base: stack / select / put, and mixed-adapter
batches in one pass (every row its own adapter) in all three modes."""

import functools

from cases import CASES
from helpers import randomize
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

MODES = ("auto", "factored", "merge")
# The factored engine runs a mixed batch whole (each adapted matmul's branch
# one batched product over rows) where it can follow the rows through the
# program, else under vmap over rows with each row's gathered factors; a
# one-hot contraction over the whole stack is the other vmap form. Every
# mixed-batch test runs all three (wrap_rows' `rows`, internal, hence _src).
@pytest.fixture(params=["auto", "gather", "one-hot"])
def contraction(request):
  """``wrap`` running mixed batches the way the parameter names."""
  from lora_jax._src.wrap import wrap_rows
  return functools.partial(wrap_rows, rows=request.param)


def _adapters(case, n=3, ranks=(2, 3, 1), alphas=(2.0, 5.0, 1.0)):
  out = []
  for k in range(n):
    cfg = lj.LoraConfig(rank=ranks[k], alpha=alphas[k], targets=case.targets)
    _, d = lj.split(case.params, cfg, jax.random.key(10 + k),
                    apply_fn=case.fn, example_args=case.args)
    out.append(randomize(d, seed=k))
  base, _ = lj.split(case.params, lj.LoraConfig(rank=1, targets=case.targets),
                     jax.random.key(0), apply_fn=case.fn, example_args=case.args)
  return base, out


def test_stack_pads_ranks_and_keeps_each_scale():
  case = CASES["attention"]
  _, ds = _adapters(case)
  s = lj.stack(ds)
  q = s["query"]["kernel"]
  assert isinstance(q, lj.LoraStack)
  assert q.a.shape == (3, 8, 3) and q.b.shape == (3, 3, 2, 4)
  np.testing.assert_allclose(q.scale, [1.0, 5.0 / 3, 1.0])
  assert q.info.ranks == (2, 3, 1)
  # padding is zeros; select gives each adapter back bit for bit
  assert float(jnp.abs(q.a[0, ..., 2:]).max()) == 0.0
  for k, d in enumerate(ds):
    back = lj.select(s, k)
    for p, want in lj.adapters(d).items():
      got = lj.adapters(back)[p]
      assert got.rank == want.rank and got.scale == want.scale
      np.testing.assert_array_equal(got.a, want.a)
      np.testing.assert_array_equal(got.b, want.b)
  assert "LoraStack(n=3, ranks=(2, 3, 1)" in repr(q)


@pytest.mark.parametrize("name", ["dense", "attention", "scan_remat", "nnx_linear",
                                  "einsum", "transposed", "embed", "conv2d"])
@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_equals_each_row_with_its_adapter(name, mode, contraction):
  case = CASES[name]
  base, ds = _adapters(case)
  stacked = lj.stack(ds)
  x = jnp.concatenate([case.args[0]] * 2)[:4]  # 4 rows
  ids = jnp.array([2, -1, 0, 1])
  apply = contraction(case.fn, mode)
  got = jax.jit(apply)(base, stacked, x, adapter_ids=ids)
  for i, k in enumerate(ids.tolist()):
    row = x[i:i + 1]
    want = (case.fn(case.params, row) if k < 0
            else lj.wrap(case.fn, "merge")(base, ds[k], row))
    np.testing.assert_allclose(got[i:i + 1], want, rtol=2e-5, atol=2e-6)


def test_minus_one_rows_equal_the_base_model_bit_for_bit(contraction):
  case = CASES["dense"]
  base, ds = _adapters(case)
  x = case.args[0]
  got = contraction(case.fn, "factored")(base, lj.stack(ds), x,
                                         adapter_ids=jnp.full(x.shape[0], -1))
  want = jax.vmap(lambda r: case.fn(case.params, r[None])[0])(x)
  np.testing.assert_array_equal(got, want)


def test_one_trace_across_id_changes_and_slot_swaps(contraction):
  case = CASES["dense"]
  # one scale: scales are static, so a put of another scale retraces
  # (test_a_stacks_scales_are_static_and_never_trained)
  base, ds = _adapters(case, ranks=(2, 2, 2), alphas=(2.0, 2.0, 2.0))
  traces = []

  def fn(p, x):
    traces.append(1)
    return case.fn(p, x)
  step = jax.jit(contraction(fn))
  stacked = lj.stack(ds[:2])
  x = jnp.stack([case.args[0][0]] * 2)  # two identical rows
  out1 = step(base, stacked, x, adapter_ids=jnp.array([0, 1]))
  # one compile; under vmap over rows wrap also traces fn once abstractly
  # on the whole batch, to find which output axis holds the rows
  first = len(traces)
  assert first <= 2
  out2 = step(base, stacked, x, adapter_ids=jnp.array([1, 0]))
  swapped = lj.put(stacked, 1, ds[2])
  out3 = step(base, swapped, x, adapter_ids=jnp.array([0, 1]))
  assert len(traces) == first  # no retrace
  np.testing.assert_allclose(out2[0], out1[1], rtol=1e-6)
  want = lj.wrap(case.fn, "merge")(base, ds[2], x[1:2])
  np.testing.assert_allclose(out3[1:2], want, rtol=2e-5, atol=2e-6)


def test_put_of_a_smaller_rank_does_not_retrace_and_select_knows_its_rank():
  case = CASES["dense"]
  base, ds = _adapters(case, ranks=(3, 3, 1), alphas=(3.0, 5.0, 1.0))
  stacked = lj.stack(ds[:2])
  put = lj.put(stacked, 0, ds[2])  # the same scale (1.0), a smaller rank
  assert jax.tree.structure(put) == jax.tree.structure(stacked)
  assert lj.select(put, 0)["kernel"].rank == 1
  with pytest.raises(ValueError, match="rank 3, more than the stack's padded rank 1"):
    lj.put(lj.stack([ds[2], ds[2]]), 0, ds[0])


def test_mixed_adapter_training_sends_each_adapter_its_own_rows(contraction):
  case = CASES["dense"]
  base, ds = _adapters(case, ranks=(2, 2, 2))
  stacked = lj.stack(ds)
  x = jnp.concatenate([case.args[0]] * 2)  # 4 rows
  ids = jnp.array([0, 0, 2, -1])
  loss = lambda s: jnp.sum(jnp.sin(contraction(case.fn, "factored")(
      base, s, x, adapter_ids=ids)))
  grads = jax.grad(loss)(stacked)
  g = grads["kernel"]
  # adapter 1 has no rows: zero gradient; adapters 0 and 2: their rows' sum
  assert float(jnp.abs(g.a[1]).max()) == 0.0 and float(jnp.abs(g.b[1]).max()) == 0.0
  g0 = jax.grad(lambda d: jnp.sum(jnp.sin(lj.wrap(case.fn, "merge")(
      base, d, x[:2]))))(ds[0])["kernel"]
  np.testing.assert_allclose(g.a[0], g0.a, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g.b[0], g0.b, rtol=1e-5, atol=1e-7)
  # one Adam step on the stack moves adapters 0 and 2 only
  tx = optax.adam(1e-2)
  new = optax.apply_updates(stacked, tx.update(grads, tx.init(stacked),
                                               stacked)[0])
  moved = lambda k: float(jnp.abs(new["kernel"].a[k] - stacked["kernel"].a[k]).max())
  assert moved(0) > 0 and moved(2) > 0 and moved(1) == 0.0


def test_stack_errors_name_the_path():
  case = CASES["dense"]
  _, ds = _adapters(case)
  other = {"kernel": lj.LoraDelta(jnp.ones((3, 2)), jnp.ones((2, 6)))}
  with pytest.raises(ValueError, match=r"adapter 1 at 'kernel' updates a kernel of shape \(3, 6\)"):
    lj.stack([ds[0], other])
  base, _ = _adapters(case)
  with pytest.raises(ValueError, match="pass adapter_ids="):
    lj.wrap(case.fn)(base, lj.stack(ds), case.args[0])
  with pytest.raises(ValueError, match="Stack them first"):
    lj.wrap(case.fn)(base, ds[0], case.args[0], adapter_ids=jnp.array([0, 1]))


def test_summary_and_describe_name_the_stack():
  case = CASES["dense"]
  base, ds = _adapters(case, ranks=(2, 3, 1))
  s = lj.stack(ds)
  text = lj.summary(base, s)
  n = 3 * (8 * 3 + 3 * 6)  # padded a (8, 3) and b (3, 6), three adapters
  assert f"adapters {n:,}" in text and "stack of 3: 2,3,1" in text
  assert "stack of 3, ranks 2,3,1" in lj.describe(s)


def test_a_row_over_the_whole_stack_is_that_adapter():
  """LoraStack.row_of_all(k) (all factors, a one-hot scale per rank column)
  stands for adapter k: merged, and in the factored engine; -1 for none."""
  case = CASES["attention"]
  base, ds = _adapters(case)
  stacked = lj.stack(ds)
  x = case.args[0]
  from lora_jax._src.stack import stacks
  for k in (0, 1, 2, -1):
    row = jax.tree.map(lambda s, k=k: s.row_of_all(k)
                       if isinstance(s, lj.LoraStack)
                       else s, stacked,
                       is_leaf=lambda s: isinstance(s, lj.LoraStack))
    for p, d in lj.adapters(row).items():
      assert d.rank == 3 * stacks(stacked)[p].rank
    want = (case.fn(case.params, x) if k < 0
            else lj.wrap(case.fn, "merge")(base, ds[k], x))
    for mode in MODES:
      np.testing.assert_allclose(lj.wrap(case.fn, mode)(base, row, x), want,
                                 rtol=2e-5, atol=2e-6)


def _paths_taken(monkeypatch):
  """Records "vmap" each time wrap falls back to vmap over rows."""
  from lora_jax._src import mixed
  taken = []
  real = mixed.per_row

  def spy(*args, **kwargs):
    taken.append("vmap")
    return real(*args, **kwargs)
  monkeypatch.setattr(mixed, "per_row", spy)
  return taken


@pytest.mark.parametrize("name,whole", [("dense", True), ("attention", True),
                                        ("nnx_linear", True),
                                        ("scan_remat", True), ("conv2d", False)])
def test_the_batch_runs_whole_where_the_rows_can_be_followed(
    name, whole, monkeypatch):
  """Dense, attention, NNX and scanned-layer models run the mixed batch whole
  (no vmap); a convolution (no per-row rule) runs under vmap over rows. Both
  equal per-row inference (test_mixed_batch_equals_each_row_with_its_adapter
  and below)."""
  taken = _paths_taken(monkeypatch)
  case = CASES[name]
  base, ds = _adapters(case)
  x = jnp.concatenate([case.args[0]] * 2)[:4]
  lj.wrap(case.fn, "factored")(base, lj.stack(ds), x,
                               adapter_ids=jnp.array([2, -1, 0, 1]))
  assert taken == ([] if whole else ["vmap"])


def test_a_program_that_mixes_rows_runs_under_vmap(monkeypatch):
  """Batch statistics (a mean over rows) would mix the rows if the batch ran
  whole: the engine cannot follow the rows there, so it runs each row on its
  own, as the per-row contract says, and the result is per-row inference."""
  taken = _paths_taken(monkeypatch)
  case = CASES["dense"]
  base, ds = _adapters(case)
  x = jnp.concatenate([case.args[0]] * 2)[:4]
  fn = lambda p, x: case.fn(p, x - x.mean(axis=0, keepdims=True))
  ids = jnp.array([2, -1, 0, 1])
  got = lj.wrap(fn, "factored")(base, lj.stack(ds), x, adapter_ids=ids)
  assert taken == ["vmap"]
  for i, k in enumerate(ids.tolist()):
    row = x[i:i + 1]
    want = (fn(case.params, row) if k < 0
            else lj.wrap(fn, "merge")(base, ds[k], row))
    np.testing.assert_allclose(got[i:i + 1], want, rtol=2e-5, atol=2e-6)


def test_a_stacks_scales_are_static_and_never_trained():
  """scale is static, as a LoraDelta's: not a leaf, so jax.grad,
  lj.optimizer and a plain optax loop (weight decay included) leave it as it
  was, and select gives adapters computing what the trained stack computes.
  A put of another scale retraces (static metadata) and computes with it."""
  case = CASES["dense"]
  base, ds = _adapters(case)  # scales 1.0, 5/3, 1.0
  stacked = lj.stack(ds)
  scales = (1.0, 5.0 / 3, 1.0)
  assert stacked["kernel"].scale == scales
  assert len(jax.tree.leaves(stacked)) == 2  # a and b only
  x = jnp.concatenate([case.args[0]] * 2)  # 4 rows
  ids = jnp.array([0, 1, 2, 1])
  apply = jax.jit(lj.wrap(case.fn, "factored"))
  single = jax.jit(lj.wrap(case.fn, "factored"))  # one trace per scale
  loss = lambda s: jnp.sum(jnp.sin(apply(base, s, x, adapter_ids=ids)))
  grads = jax.grad(loss)(stacked)
  assert grads["kernel"].scale == scales
  pair_tx = lj.optimizer(optax.adamw(0.1, weight_decay=0.5))
  pair = (base, stacked)
  g_pair = (jax.tree.map(jnp.zeros_like, base), grads)
  _, trained = optax.apply_updates(pair, pair_tx.update(
      g_pair, pair_tx.init(pair), pair)[0])
  tx = optax.adamw(0.1, weight_decay=0.5)
  plain = optax.apply_updates(stacked, tx.update(grads, tx.init(stacked),
                                                 stacked)[0])
  for new in (trained, plain):
    s = new["kernel"]
    assert s.scale == scales
    assert float(jnp.abs(s.a - stacked["kernel"].a).max()) > 0.01  # trained
    got = apply(base, new, x, adapter_ids=ids)
    for i, k in enumerate(ids.tolist()):
      one = lj.select(new, k)
      assert one["kernel"].scale == scales[k]
      want = single(base, one, x[i:i + 1])
      np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-5, atol=1e-6)
  # tree operations keep the scales; a put of another scale is used at once
  doubled = jax.tree.map(lambda v: 2 * v, stacked)
  assert doubled["kernel"].scale == scales
  other = {"kernel": ds[0]["kernel"].replace(scale=4.0)}
  swapped = lj.put(stacked, 1, other)
  assert swapped["kernel"].scale == (1.0, 4.0, 1.0)
  got = apply(base, swapped, x, adapter_ids=ids)
  want = single(base, other, x[1:2])
  np.testing.assert_allclose(got[1:2], want, rtol=1e-5, atol=1e-6)


def test_a_stack_of_stacks_is_refused():
  case = CASES["dense"]
  _, ds = _adapters(case)
  s = lj.stack(ds)
  with pytest.raises(ValueError, match=r"lj.stack: delta 0 holds a stack of "
                     r"adapters \(a LoraStack at \['kernel'\]\); stacks do "
                     r"not nest\. Stack single adapters: lj.stack\("
                     r"\[lj.select\(stacked, i\)"):
    lj.stack([s, s])
  with pytest.raises(ValueError, match=r"delta 1 holds a stack of adapters"):
    lj.stack([ds[0], s])
  with pytest.raises(ValueError, match=r"lj.stack: delta 0 holds no adapter"):
    lj.stack([{"kernel": None}])


def test_principal_init_marks_are_kept_per_adapter_and_checked(tmp_path):
  """PiSSA adapters keep their residual-base marks in a stack, in select and
  through save_stack / load_stack; a stack on the original weights is refused
  as a single adapter is, and adapters of different bases do not stack."""
  case = CASES["dense"]
  cfg = lj.LoraConfig(rank=2, targets=case.targets, init="pissa")
  residual, d0 = lj.split(case.params, cfg, jax.random.key(1))
  ds = [randomize(d0, seed=k) for k in range(2)]  # "trained"
  mark = d0["kernel"].residual_of
  assert mark is not None and mark.init == "pissa"
  s = lj.stack(ds)
  assert s["kernel"].residual_of == (mark, mark)
  assert lj.select(s, 1)["kernel"].residual_of == mark
  back = lj.load_stack(lj.save_stack(tmp_path / "s", s))
  assert back["kernel"].residual_of == (mark, mark)
  x = case.args[0]
  ids = jnp.array([1, 0])
  with pytest.raises(ValueError, match=r"Adapter 0 of the stack at 'kernel' "
                     r"was made with init='pissa'.*looks like the original "
                     r"weights.*lora_jax.to_plain_lora"):
    lj.wrap(case.fn)(case.params, back, x, adapter_ids=ids)
  with pytest.raises(ValueError, match=r"The adapter at 'kernel' was made "
                     r"with init='pissa'"):
    lj.merge(case.params, lj.select(back, 0))
  got = lj.wrap(case.fn)(residual, back, x, adapter_ids=ids)  # its base: runs
  for i, k in enumerate(ids.tolist()):
    want = lj.wrap(case.fn, "merge")(residual, ds[k], x[i:i + 1])
    np.testing.assert_allclose(got[i:i + 1], want, rtol=2e-5, atol=2e-6)
  plain = lj.split(case.params, lj.LoraConfig(rank=2, targets=case.targets),
                   jax.random.key(2))[1]
  with pytest.raises(ValueError, match=r"lj.stack: at 'kernel' adapter 1 is "
                     r"a plain adapter \(for the original weights\) and "
                     r"adapter 0 was made with init='pissa'.*one base"):
    lj.stack([ds[0], plain])
  with pytest.raises(ValueError, match=r"lj.put: at 'kernel' adapter 0 is a "
                     r"plain adapter.*adapter 1 was made with init='pissa'"):
    lj.put(s, 0, plain)


def test_out_of_range_indices_and_misplaced_stacks_say_so(tmp_path):
  case = CASES["dense"]
  base, ds = _adapters(case)
  s = lj.stack(ds)
  valid = r"valid indices are 0\.\.2 \(or -3\.\.-1 from the end\)"
  with pytest.raises(IndexError, match=r"lj.select: adapter index 3 is out "
                     r"of range for a stack of 3 adapters: " + valid):
    lj.select(s, 3)
  with pytest.raises(IndexError, match=r"lj.put: adapter index -4 is out of "
                     r"range for a stack of 3 adapters: " + valid):
    lj.put(s, -4, ds[0])
  np.testing.assert_array_equal(lj.select(s, -1)["kernel"].a, ds[2]["kernel"].a)
  stack_at = r"the delta holds a stack of adapters \(lj.stack\) at \['kernel'\]"
  # a stack beside a single adapter is refused too (not merged in part)
  mixed = {"kernel": s["kernel"], "bias": ds[0]["kernel"]}
  for call, who, instead in [
      (lambda: lj.merge(base, s), "merge", r"lj.merge\(base, lj.select"),
      (lambda: lj.merge(base, mixed), "merge", r"lj.select\(stacked, k\)"),
      (lambda: lj.unmerge(case.params, s), "unmerge",
       r"lj.unmerge\(params, lj.select"),
      (lambda: lj.combine([ds[0], s]), r"lj.combine \(delta 1\)",
       r"lj.combine\(\[lj.select\(stacked, k\)"),
      (lambda: lj.explain(case.fn, base, s, case.args[0]), "explain",
       r"lj.explain\(fn, base, lj.select\(stacked, k\)"),
      (lambda: lj.save(tmp_path / "x", s), "lora_jax.save",
       r"lora_jax.save_stack")]:
    with pytest.raises(ValueError, match=rf"^{who}: {stack_at}.*{instead}"):
      call()
  assert not (tmp_path / "x").exists()


def test_wrap_rows_refuses_an_unknown_row_mode():
  from lora_jax._src.wrap import wrap_rows
  with pytest.raises(ValueError, match=r"rows must be one of \('auto', 'gather', 'one-hot'\), got 'whole'"):
    wrap_rows(lambda p, x: x, "factored", rows="whole")
