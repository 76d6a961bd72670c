"""LoftQ (lj.loftq, LoraConfig(init="loftq")): the reconstruction error
||W - (dequant(Q) + s a b)||_F falls with the iterations, each iteration is
the numpy reimplementation's, and the pair runs in both engines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import loftq as loftq_module

BLOCK, RANK = 16, 4
# a kernel with a little low-rank structure, as trained weights have
_KEYS = jax.random.split(jax.random.key(0), 3)
W = (jax.random.normal(_KEYS[0], (64, 48)) + 0.5 * jax.random.normal(
    _KEYS[1], (64, 2)) @ jax.random.normal(_KEYS[2], (2, 48))) / 8
PARAMS = {"fc": {"kernel": W, "bias": jnp.zeros(48)}}


def _config(iters):
  return lj.LoraConfig(rank=RANK, alpha=8.0, targets="fc/kernel",
                       init="loftq", loftq_iters=iters)


def _error(qbase, delta):
  return float(jnp.linalg.norm(W - lj.merge(qbase, delta)["fc"]["kernel"]))


@pytest.fixture(scope="module")
def iterates():
  """``{scheme: [(qbase, delta) after step 1, ..., 5]}``."""
  return {scheme: list(loftq_module.steps(
      PARAMS, _config(5), jax.random.key(1), scheme, BLOCK, False, None, (),
      None)) for scheme in ("int8", "nf4")}


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_error_falls_with_iterations(iterates, scheme):
  qlora = lj.dequantize(lj.quantize(PARAMS, scheme, BLOCK))["fc"]["kernel"]
  zero_init = float(jnp.linalg.norm(W - qlora))
  errors = [_error(q, d) for q, d in iterates[scheme]]
  assert errors[0] < zero_init
  assert all(b <= a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0]


def test_loftq_iters_is_that_many_steps(iterates):
  qbase, delta = lj.loftq(PARAMS, _config(2), jax.random.key(1), "int8",
                          BLOCK)
  q2, d2 = iterates["int8"][1]
  assert isinstance(qbase["fc"]["kernel"], lj.QArray)
  np.testing.assert_array_equal(qbase["fc"]["kernel"].codes,
                                q2["fc"]["kernel"].codes)
  np.testing.assert_array_equal(delta["fc"]["kernel"].a, d2["fc"]["kernel"].a)
  assert qbase["fc"]["bias"] is PARAMS["fc"]["bias"]  # not adapted: as is


def _np_int8(x):
  """lj.quantize's int8, in numpy: blocks of BLOCK rows per column."""
  blocks = x.reshape(-1, BLOCK, x.shape[1])
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  codes = np.round(blocks * (np.float32(127) / absmax))
  return (codes * (absmax * np.float32(1 / 127))).reshape(x.shape)


def _np_truncated(m, rank):
  u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_each_step_is_the_numpy_one(iterates):
  w = np.asarray(W)
  scale = 8.0 / RANK
  previous = np.zeros_like(w)  # s a b before step 1: QLoRA's zero init
  for qbase, delta in iterates["int8"][:2]:
    deq = _np_int8(w - previous)
    np.testing.assert_allclose(lj.dequantize(qbase)["fc"]["kernel"], deq,
                               atol=1e-6)
    sab = scale * np.asarray(delta["fc"]["kernel"].a @ delta["fc"][
        "kernel"].b)
    np.testing.assert_allclose(sab, _np_truncated(w - deq, RANK), atol=2e-5)
    previous = sab


def test_engines_on_the_pair(iterates):
  qbase, delta = iterates["nf4"][-1]
  f = lambda p, x: jnp.tanh(x @ p["fc"]["kernel"] + p["fc"]["bias"])
  x = jax.random.normal(jax.random.key(5), (3, 64))
  ref = f(lj.merge(qbase, delta), x)
  for mode in ("merge", "factored"):
    np.testing.assert_allclose(lj.wrap(f, mode)(qbase, delta, x), ref,
                               atol=2e-5)


def test_bf16_kernel_and_transposed_layout():
  # a bf16 (out, in) kernel used as x @ w.T: blocks along its axis 1
  w = W.T.astype(jnp.bfloat16)
  f = lambda p, x: x @ p["w"].T
  cfg = lj.LoraConfig(rank=RANK, targets="w", init="loftq", loftq_iters=2)
  qbase, delta = lj.loftq({"w": w}, cfg, jax.random.key(0), "int8", BLOCK,
                          apply_fn=f, example_args=(jnp.ones((1, 64)),))
  assert delta["w"].layout == lj.Layout.transposed()
  assert qbase["w"].axis == 1 and qbase["w"].dtype == jnp.bfloat16
  qlora = lj.dequantize(lj.quantize({"w": w}, "int8", BLOCK,
                                    layouts={"w": lj.Layout.transposed()}))
  err = lambda t: float(jnp.linalg.norm(w.astype(jnp.float32)
                                        - t["w"].astype(jnp.float32)))
  assert err(lj.merge(qbase, delta)) < err(qlora)


def test_errors():
  with pytest.raises(ValueError, match=r"init='loftq'.*lora_jax.loftq"):
    lj.split(PARAMS, _config(1), jax.random.key(0))
  with pytest.raises(ValueError, match=r"pass a LoraConfig with init='loftq'"):
    lj.loftq(PARAMS, lj.LoraConfig(targets="fc/kernel"), jax.random.key(0))
  with pytest.raises(ValueError, match=r"needs the float weights.*fc/kernel"):
    lj.loftq(lj.quantize(PARAMS, "int8", BLOCK, targets="fc/kernel"),
             _config(1), jax.random.key(0), "int8", BLOCK)
  with pytest.raises(ValueError, match="scheme must be one of"):
    lj.loftq(PARAMS, _config(1), jax.random.key(0), "int4")
  with pytest.raises(ValueError, match="loftq_iters must be an int >= 1"):
    _config(0)
