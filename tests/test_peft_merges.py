"""lj.loraplus and lj.combine against PEFT itself (torch, CPU): LoRA+'s
factors after 3 steps from identical gradients equal create_loraplus_optimizer
with torch's AdamW, and every deterministic combination type gives
add_weighted_adapter's delta weights (get_delta_weight), on a tiny torch
model with an embedding and two linear layers. Run on the py311 CI leg
(LORA_JAX_INTEROP=1); skipped elsewhere without torch and peft."""

import os
import warnings

import jax
import numpy as np
import optax
import pytest

import lora_jax as lj

INTEROP_REASON = "interop tests run on the py311 CI leg (LORA_JAX_INTEROP=1)"
MODULES = ("emb", "lin", "out")
# lora_jax's path of each torch module's weight: a Flax Embed table
# (vocab, dim) and Dense kernels (in, out)
PATHS = {"emb": "emb/embedding", "lin": "lin/kernel", "out": "out/kernel"}


@pytest.fixture(scope="module")
def torch_peft():
  """torch and peft, or a skip (a failure with LORA_JAX_INTEROP=1, where CI
  promises to run these tests)."""
  try:
    import peft
    import torch
  except ImportError as e:
    if os.environ.get("LORA_JAX_INTEROP") == "1":
      pytest.fail(f"LORA_JAX_INTEROP=1 but {e}: install lora_jax[interop].")
    pytest.skip(INTEROP_REASON)
  return torch, peft


def _net(torch):
  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.emb = torch.nn.Embedding(10, 6)
      self.lin = torch.nn.Linear(6, 5)
      self.out = torch.nn.Linear(5, 4)

    def forward(self, ids):
      return self.out(self.lin(self.emb(ids)))
  torch.manual_seed(0)
  return Net()


def _factors(model, module, name):
  """PEFT's (A, B, scaling) of adapter ``name`` on ``module``."""
  layer = getattr(model.base_model.model, module)
  if name in layer.lora_embedding_A:
    a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
  else:
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
  return a, b, layer.scaling[name]


def _np(t):
  return t.detach().double().numpy()


def _delta(model, name):
  """lora_jax's delta tree of PEFT adapter ``name``: a = A.T, b = B.T on
  the (in, out) kernels and the (vocab, dim) table."""
  out = {}
  for m in MODULES:
    a, b, s = _factors(model, m, name)
    out[m] = {PATHS[m].split("/")[1]: lj.LoraDelta(
        np.asarray(_np(a).T, np.float32), np.asarray(_np(b).T, np.float32),
        scale=float(s))}
  return out


def _peft_weight(model, module, name):
  """PEFT's delta weight in lora_jax's orientation (its Linear's is (out,
  in); its Embedding's is already (vocab, dim))."""
  w = _np(getattr(model.base_model.model, module).get_delta_weight(name))
  return w if module == "emb" else w.T


@pytest.fixture(scope="module")
def adapters(torch_peft):
  """{ranks: peft model with adapters "x" and "y"} with random A and B."""
  torch, peft = torch_peft
  out = {}
  for ranks in ((2, 2), (2, 3)):
    model = None
    for name, r, alpha in zip("xy", ranks, (4.0, 3.0)):
      cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(MODULES),
                            init_lora_weights=False)
      if model is None:
        model = peft.get_peft_model(_net(torch), cfg, adapter_name=name)
      else:
        model.add_adapter(name, cfg)
    out[ranks] = model
  return out


CASES = [  # (combination_type, ranks, extra arguments)
    ("linear", (2, 2), {}),
    ("ties", (2, 2), {"density": 0.5}),
    ("ties", (2, 2), {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", (2, 2), {"density": 0.4}),
    # DARE at density 1: PEFT prunes nothing (the masks are torch's draws)
    ("dare_linear", (2, 2), {"density": 1.0}),
    ("dare_ties", (2, 2), {"density": 1.0}),
    ("cat", (2, 3), {}),
    ("svd", (2, 3), {}),
    ("svd", (2, 3), {"rank": 4}),
    ("ties_svd", (2, 3), {"density": 0.5}),
    ("magnitude_prune_svd", (2, 3), {"density": 0.6}),
    ("dare_linear_svd", (2, 3), {"density": 1.0}),
    ("dare_ties_svd", (2, 3), {"density": 1.0, "rank": 2}),
]


@pytest.mark.parametrize("method,ranks,kw", CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_combine_equals_add_weighted_adapter(adapters, method, ranks, kw):
  model = adapters[ranks]
  weights = [0.7, -1.3]
  name = f"merged_{method}_{len(model.peft_config)}"
  peft_kw = {"svd_rank": kw["rank"]} if "rank" in kw else {}
  peft_kw.update({k: v for k, v in kw.items() if k != "rank"})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PEFT: density 1 prunes nothing
    model.add_weighted_adapter(["x", "y"], weights, name,
                               combination_type=method, **peft_kw)
  key = jax.random.key(0) if method.startswith("dare") else None
  got = lj.combine([_delta(model, "x"), _delta(model, "y")], weights, method,
                   key=key, **kw)
  merged = lj.adapters(got)
  for m in MODULES:
    want = _peft_weight(model, m, name)
    d = merged[PATHS[m]]
    np.testing.assert_allclose(np.asarray(d.weight(), np.float64), want,
                               rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                               err_msg=f"{method} {m}")
    # PEFT's new adapter: alpha = r, scale 1; the same rank
    assert d.scale == 1.0 == _factors(model, m, name)[2]
    assert d.rank == _factors(model, m, name)[0].shape[0]
  # not vacuous: where PEFT's merge is not the weighted sum of the updates
  # (cross terms, pruning, truncation), neither is ours
  summed = sum(w * lj.adapters(_delta(model, n))["lin/kernel"].weight()
               for w, n in zip(weights, "xy"))
  gap = float(np.abs(merged["lin/kernel"].weight() - summed).max())
  assert (gap < 1e-5) if method == "cat" else (gap > 1e-3), gap


def test_loraplus_equals_create_loraplus_optimizer(torch_peft):
  """Three AdamW steps from the same gradients: PEFT's groups (lora_A at lr;
  lora_B, DoRA magnitudes and a trained bias at lr * ratio, the bias without
  decay; the embedding adapter at loraplus_lr_embedding; a trained base
  kernel at lr) and lora_jax's, for every trained parameter."""
  torch, peft = torch_peft
  from peft.optimizers import create_loraplus_optimizer
  cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(MODULES),
                        use_dora=True, init_lora_weights=False)
  model = peft.get_peft_model(_net(torch), cfg)
  inner = model.base_model.model
  inner.lin.base_layer.bias.requires_grad_(True)
  inner.out.base_layer.weight.requires_grad_(True)
  lr, ratio, emb_lr, wd = 1e-2, 4.0, 3e-3, 0.1
  opt = create_loraplus_optimizer(
      model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
      loraplus_lr_embedding=emb_lr, loraplus_weight_decay=wd, eps=1e-6)
  trained = {n: p for n, p in model.named_parameters() if p.requires_grad}

  # lora_jax's (base, delta), each leaf tied to its torch parameter; 2-D
  # factors and kernels are the transposes
  def leaf(name):
    p = trained[name]
    x = _np(p).T if p.ndim == 2 else _np(p)
    return np.asarray(x, np.float32)
  pre = "base_model.model."
  names = {}
  delta = {}
  for m in MODULES:
    emb = m == "emb"
    sub = "embedding" if emb else "kernel"
    a = f"{pre}{m}.lora_embedding_A.default" if emb else (
        f"{pre}{m}.lora_A.default.weight")
    b = f"{pre}{m}.lora_embedding_B.default" if emb else (
        f"{pre}{m}.lora_B.default.weight")
    mag = f"{pre}{m}.lora_magnitude_vector.default.weight"
    delta[m] = {sub: lj.LoraDelta(leaf(a), leaf(b), scale=2.0,
                                  magnitude=leaf(mag))}
    names.update({f"1/{m}/{sub}/a": a, f"1/{m}/{sub}/b": b,
                  f"1/{m}/{sub}/magnitude": mag})
  base = {"lin": {"bias": leaf(f"{pre}lin.base_layer.bias")},
          "out": {"kernel": leaf(f"{pre}out.base_layer.weight")}}
  names.update({"0/lin/bias": f"{pre}lin.base_layer.bias",
                "0/out/kernel": f"{pre}out.base_layer.weight"})
  assert sorted(names.values()) == sorted(trained)
  params = (base, delta)
  paths = [p for p, _ in lj.leaves_with_paths(params)]
  tx = lj.optimizer(lj.loraplus(optax.adamw, lr, ratio, emb_lr,
                                loraplus_weight_decay=wd, eps=1e-6),
                    trainable=r".*")
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = {n: rng.normal(size=tuple(p.shape)) for n, p in trained.items()}
    for n, p in trained.items():
      p.grad = torch.tensor(grads[n], dtype=p.dtype)
    opt.step()
    g = jax.tree.unflatten(jax.tree.structure(params), [
        np.asarray(grads[names[p]].T if grads[names[p]].ndim == 2
                   else grads[names[p]], np.float32) for p in paths])
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  for path, x in zip(paths, jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), leaf(names[path]), rtol=1e-5,
                               atol=1e-6, err_msg=path)
  # and the steps moved every leaf (Adam: about lr per step)
  start = lj.leaves_with_paths((base, delta))
  assert min(float(np.abs(np.asarray(x) - np.asarray(x0)).max())
             for (_, x0), x in zip(start, jax.tree.leaves(params))) > 5e-3


def test_loraplus_groups_trainable_tokens_as_peft(torch_peft):
  """PEFT puts trainable token rows (trainable_tokens_delta, 2-D) in the
  lora_A group (lr, decayed); lora_jax puts TrainableTokens.values there."""
  torch, peft = torch_peft
  from peft.optimizers import create_loraplus_optimizer
  cfg = peft.LoraConfig(r=2, target_modules=["lin", "out"],
                        trainable_token_indices={"emb": [1, 3]})
  model = peft.get_peft_model(_net(torch), cfg)
  opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2,
                                  loraplus_lr_ratio=4.0,
                                  loraplus_weight_decay=0.1)
  rows = [p for n, p in model.named_parameters()
          if "trainable_tokens_delta" in n]
  assert len(rows) == 1 and rows[0].ndim == 2
  group = next(g for g in opt.param_groups
               if any(p is rows[0] for p in g["params"]))
  assert (group["lr"], group["weight_decay"]) == (1e-2, 0.1)
  from lora_jax._src import loraplus as lp
  tokens = {"emb": {"embedding": lj.TrainableTokens(
      np.asarray(_np(rows[0]), np.float32), (1, 3), vocab=10)}}
  assert jax.tree.leaves(lp.loraplus_labels(tokens)) == [lp.A]
