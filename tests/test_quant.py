"""QLoRA storage: lj.quantize / lj.dequantize / lj.QArray against numpy."""

import re
from statistics import NormalDist

from helpers import make_mesh
from helpers import tanh_stack
from helpers import train_mse
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj

# bitsandbytes' NF4 table (functional.py, `get_4bit_type("nf4")`), as published.
PUBLISHED_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


def nf4_from_definition() -> np.ndarray:
  """The QLoRA paper's NF4: N(0,1) quantiles with an exact zero, in [-1, 1]."""
  ppf = NormalDist().inv_cdf
  offset = ((1 - 1 / 30) + (1 - 1 / 32)) / 2  # 0.9677083...
  spaced = lambda n: [offset + (0.5 - offset) * i / (n - 1) for i in range(n)]
  positive = [ppf(p) for p in spaced(9)[:-1]]
  negative = [-ppf(p) for p in spaced(8)[:-1]]
  values = np.array(sorted(positive + [0.0] + negative))
  return values / values.max()


def table_of_library() -> np.ndarray:
  """The 16 NF4 values, read through dequantize (codes 0..15, absmax 1)."""
  codes = np.array([[16 * i + i + 1] for i in range(0, 16, 2)], np.uint8)
  q = lj.QArray(jnp.asarray(codes), jnp.ones((1, 1)), scheme="nf4",
                block_size=16, shape=(16, 1), dtype=np.dtype(np.float32))
  return np.asarray(lj.dequantize(q))[:, 0]


# --- an independent numpy reference of blockwise absmax quantization --------


def blocks_first(w, axis, block):
  """``w`` in float32 as (n_blocks, block, *other axes), the axis moved first."""
  x = np.moveaxis(np.asarray(w, np.float32), axis, 0)
  return x.reshape(x.shape[0] // block, block, *x.shape[1:])


def ref_quantize(w, scheme, block, axis=0):
  """(codes in kernel order, one per entry, and absmax (blocks, *other))."""
  xb = blocks_first(w, axis, block)
  absmax = np.abs(xb).max(axis=1)
  den = np.where(absmax > 0, absmax, np.float32(1))[:, None]
  if scheme == "int8":  # round(127 x / absmax) as x * (127 / absmax)
    codes = np.round(xb * (np.float32(127) / den)).astype(np.int8)
  else:  # nearest value to x * (1 / absmax); on a midpoint, the lower one
    mids = (PUBLISHED_NF4[1:] + PUBLISHED_NF4[:-1]) / np.float32(2)
    codes = np.searchsorted(mids, xb * (np.float32(1) / den),
                            side="left").astype(np.uint8)
  codes = np.moveaxis(codes.reshape(-1, *codes.shape[2:]), 0, axis)
  return codes, absmax


def ref_pack(codes, axis):
  """Two 4-bit codes per byte along ``axis``: entry 2j high, 2j+1 low."""
  c = np.moveaxis(codes, axis, 0)
  return np.moveaxis(c[0::2] * 16 + c[1::2], 0, axis).astype(np.uint8)


def ref_double_quant(absmax, mean):
  """int8 codes of (absmax - mean) in blocks of 256, and the block scales."""
  flat = absmax.reshape(-1) - np.float32(mean)
  n = flat.size
  padded = np.zeros(-(-n // 256) * 256, np.float32)
  padded[:n] = flat
  padded = padded.reshape(-1, 256)
  scale = np.abs(padded).max(axis=1)
  den = np.where(scale > 0, scale, np.float32(1))[:, None]
  codes = np.round(padded * (np.float32(127) / den)).astype(np.int8)
  return codes.reshape(-1)[:n].reshape(absmax.shape), scale


def ref_absmax_back(codes, scale, mean):
  full = np.repeat(scale, 256)[:codes.size].reshape(codes.shape)
  return codes.astype(np.float32) * np.float32(1 / 127) * full + np.float32(mean)


def ref_dequantize(codes, absmax, scheme, block, axis, dtype):
  values = (PUBLISHED_NF4[codes] if scheme == "nf4" else codes.astype(np.float32))
  step = absmax if scheme == "nf4" else absmax * np.float32(1 / 127)
  vb = blocks_first(values, axis, block) * step[:, None]
  x = vb.reshape(-1, *vb.shape[2:])
  return np.moveaxis(x, 0, axis).astype(dtype)


def as_blocks(absmax_stored, axis):
  """The QArray's absmax (kernel order, axis shortened) as (blocks, *other)."""
  return np.moveaxis(np.asarray(absmax_stored), axis, 0)


# --- cases -------------------------------------------------------------------

def _kernel(shape, seed=0, dtype=jnp.float32):
  w = jax.random.normal(jax.random.key(seed), shape) * 0.05
  w = w.at[..., :1].multiply(40.0)  # uneven block maxima
  return w.astype(dtype)


CASES = {
    # name: (shape, layout or None, axis the blocks run along, dtype)
    "dense": ((256, 96), None, 0, jnp.float32),
    "transposed": ((48, 128), lj.Layout.transposed(), 1, jnp.float32),
    "stacked": ((3, 128, 40), lj.Layout((0,), (1,), (2,)), 1, jnp.float32),
    "conv": ((3, 3, 64, 16), lj.Layout((), (0, 1, 2), (3,)), 2, jnp.float32),
    "bf16": ((128, 64), None, 0, jnp.bfloat16),
}


def _quantize_case(name, scheme, double_quant=False, block=32):
  shape, layout, axis, dtype = CASES[name]
  w = _kernel(shape, dtype=dtype)
  if name == "dense":
    w = w.at[:block, 5].set(0.0)  # an all-zero block
  layouts = None if layout is None else {"w": layout}
  q = lj.quantize({"w": w}, scheme, block_size=block, layouts=layouts,
                  double_quant=double_quant)["w"]
  return w, q, axis


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("name", list(CASES))
def test_codes_equal_the_numpy_reference(name, scheme):
  w, q, axis = _quantize_case(name, scheme)
  codes, absmax = ref_quantize(w, scheme, 32, axis)
  assert q.axis == axis and q.shape == w.shape and q.dtype == w.dtype
  assert q.codes.dtype == (np.uint8 if scheme == "nf4" else np.int8)
  want_codes = ref_pack(codes, axis) if scheme == "nf4" else codes
  np.testing.assert_array_equal(np.asarray(q.codes), want_codes)
  np.testing.assert_array_equal(as_blocks(q.absmax, axis), absmax)
  assert q.absmax.dtype == np.float32
  # dequantize: table value (or code / 127) times the block's absmax
  want = ref_dequantize(codes, absmax, scheme, 32, axis, w.dtype)
  np.testing.assert_array_equal(np.asarray(lj.dequantize(q)), want)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("name", ["dense", "stacked"])
def test_double_quant_codes_equal_the_numpy_reference(name, scheme):
  w, q, axis = _quantize_case(name, scheme, double_quant=True, block=16)
  codes, absmax = ref_quantize(w, scheme, 16, axis)
  want_codes = ref_pack(codes, axis) if scheme == "nf4" else codes
  np.testing.assert_array_equal(np.asarray(q.codes), want_codes)
  stored = np.moveaxis(absmax, 0, axis)  # absmax in kernel order
  mean = float(q.absmax_mean)
  np.testing.assert_allclose(mean, stored.mean(dtype=np.float64), rtol=1e-6)
  dq_codes, scale = ref_double_quant(stored, mean)
  assert q.absmax.dtype == np.int8 and q.absmax_scale.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(q.absmax), dq_codes)
  np.testing.assert_array_equal(np.asarray(q.absmax_scale), scale)
  back = ref_absmax_back(dq_codes, scale, mean)
  want = ref_dequantize(codes, as_blocks(back, axis), scheme, 16, axis, w.dtype)
  np.testing.assert_allclose(np.asarray(lj.dequantize(q)), want, rtol=1e-6,
                             atol=1e-9)


def test_nf4_table_is_the_papers():
  np.testing.assert_allclose(nf4_from_definition(), PUBLISHED_NF4, atol=2e-7)
  np.testing.assert_array_equal(table_of_library(), PUBLISHED_NF4)


def test_nf4_ties_go_to_the_lower_code():
  mids = (PUBLISHED_NF4[1:] + PUBLISHED_NF4[:-1]) / np.float32(2)
  up = np.nextafter(mids, np.float32(2))
  column = np.concatenate([[1.0], mids, up, np.zeros(64 - 31)]).astype(
      np.float32)
  q = lj.quantize({"w": jnp.asarray(column)[:, None]}, "nf4")["w"]
  unpacked = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15],
                      axis=1).reshape(-1)
  assert unpacked[0] == 15  # the absmax itself is +1.0
  np.testing.assert_array_equal(unpacked[1:16], np.arange(15))   # on a midpoint
  np.testing.assert_array_equal(unpacked[16:31], np.arange(1, 16))  # just above
  assert (unpacked[31:] == 7).all()  # exact zero


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_error_within_half_a_code_gap(scheme, double_quant):
  w = _kernel((512, 64), seed=3)
  q = lj.quantize({"w": w}, scheme, block_size=64,
                  double_quant=double_quant)["w"]
  err = np.abs(np.asarray(lj.dequantize(q)) - np.asarray(w))
  absmax = np.abs(blocks_first(w, 0, 64)).max(axis=1)
  half_gap = (np.diff(PUBLISHED_NF4).max() / 2 if scheme == "nf4"
              else 0.5 / 127)
  bound = half_gap * absmax
  if double_quant:  # plus the error of the stored absmax (|code value| <= 1)
    bound = bound + np.abs(as_blocks(
        q.block_absmax(), 0) - absmax)
  bound = np.repeat(bound, 64, axis=0)
  assert (err <= bound * (1 + 1e-6) + 1e-9).all()
  # and the bound is tight: nf4's widest gap is 0.277 of the absmax
  assert err.max() > 0.5 * (bound.max() if scheme == "int8" else 0.1 * bound.max())


def test_nbytes_repr_and_pytree():
  w = _kernel((512, 512))
  q = lj.quantize({"w": w}, "nf4", block_size=64)["w"]
  assert q.nbytes == 512 * 512 // 2 + 4 * 512 * 512 // 64
  assert (q.shape, q.ndim, q.dtype, q.size) == ((512, 512), 2, np.float32,
                                                512 * 512)
  assert repr(q) == "QArray(nf4, f32[512,512], block 64)"
  assert [x.shape for x in jax.tree.leaves(q)] == [(256, 512), (8, 512)]
  i8 = lj.quantize({"w": w}, "int8", block_size=128, double_quant=True)["w"]
  # int8 codes, 4 x 512 int8 absmax, 8 float32 scales (256 each), one mean
  assert i8.nbytes == 512 * 512 + 4 * 512 + 8 * 4 + 4
  assert repr(i8) == "QArray(int8, f32[512,512], block 128, double quant)"
  t = lj.quantize({"w": _kernel((8, 64)).astype(jnp.bfloat16)}, "nf4",
                  block_size=32, layouts={"w": lj.Layout.transposed()})["w"]
  assert repr(t) == "QArray(nf4, bf16[8,64], block 32, axis 1)"
  # jit-able and the same as eager; the tree structure survives jit
  np.testing.assert_array_equal(jax.jit(lj.dequantize)(q), lj.dequantize(q))
  again = jax.jit(lambda q: q)(q)
  assert isinstance(again, lj.QArray) and repr(again) == repr(q)


@pytest.mark.parametrize("double_quant", [False, True])
def test_scan_over_a_stacked_quantized_kernel(double_quant):
  w = _kernel((4, 64, 24), seed=2)
  q = lj.quantize({"w": w}, "int8", block_size=16, double_quant=double_quant,
                  layouts={"w": lj.Layout((0,), (1,), (2,))})["w"]
  view = q.scan_view()
  assert repr(view) == "QArray(int8, f32[64,24], block 16)"
  x = jax.random.normal(jax.random.key(0), (5, 64))
  y, _ = jax.lax.scan(lambda h, ql: (jnp.tanh(h @ lj.dequantize(ql))[:, :1] * h,
                                     None), x, view)
  want = x
  for layer in lj.dequantize(q):
    want = jnp.tanh(want @ layer)[:, :1] * want
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=re.escape(
      "QArray.scan_view: QArray(nf4, f32[64,8], block 64) has its blocks "
      "along axis 0")):
    lj.quantize({"w": _kernel((64, 8))}, "nf4")["w"].scan_view()


def test_default_targets_and_paths():
  params = {"emb": {"embedding": _kernel((64, 8))},
            "fc": {"kernel": _kernel((64, 16)), "bias": jnp.zeros(16)},
            "steps": jnp.arange(64 * 2).reshape(64, 2)}
  q = lj.quantize(params, "int8", block_size=32)
  assert isinstance(q["emb"]["embedding"], lj.QArray)
  assert isinstance(q["fc"]["kernel"], lj.QArray)
  assert q["fc"]["bias"] is params["fc"]["bias"]
  assert q["steps"] is params["steps"]  # not a float leaf: left alone
  # a quantized kernel is one leaf at its kernel's path
  assert [p for p, _ in lj.leaves_with_paths(q)] == [
      "emb/embedding", "fc/bias", "fc/kernel", "steps"]
  shapes = lj.map_with_paths(lambda p, x: (p, x.shape), q)
  assert shapes["fc"]["kernel"] == ("fc/kernel", (64, 16))
  only = lj.quantize(params, "nf4", block_size=32, targets=r"fc/.*kernel")
  assert isinstance(only["fc"]["kernel"], lj.QArray)
  assert not isinstance(only["emb"]["embedding"], lj.QArray)
  # a list of regexes, or a predicate (path, leaf) -> bool, as LoraConfig
  for targets in (["emb/.*"], lambda p, x: p.startswith("emb")):
    picked = lj.quantize(params, "nf4", block_size=32, targets=targets)
    assert [p for p, x in lj.leaves_with_paths(picked)
            if isinstance(x, lj.QArray)] == ["emb/embedding"]
  assert jax.tree.map(jnp.shape, lj.dequantize(q)) == jax.tree.map(
      jnp.shape, params)


def test_errors_name_the_leaf_and_the_remedy():
  params = {"fc": {"kernel": jnp.ones((100, 8)), "bias": jnp.zeros(8)},
            "ids": jnp.ones((64, 2), jnp.int32),
            "stack": jnp.ones((2, 64, 8))}
  with pytest.raises(ValueError, match=re.escape(
      "quantize: block_size 64 does not divide the length 100 of axis 0 of "
      "'fc/kernel' (shape (100, 8)), the contracted axis the blocks run "
      "along. Block sizes that divide it: 10, 20, 50, 100. Or leave the leaf "
      "out of targets.")):
    lj.quantize(params, "nf4", targets="fc/kernel")
  with pytest.raises(TypeError, match=re.escape(
      "quantize: 'ids' is not a floating-point array (dtype int32); only "
      "float kernels can be quantized. Narrow `targets`.")):
    lj.quantize(params, "int8", targets="ids")
  with pytest.raises(ValueError, match=re.escape(
      "quantize: 'fc/bias' has shape (8,); quantize stores kernels (2 or more "
      "axes)")):
    lj.quantize(params, "int8", block_size=8, targets="fc/bias")
  with pytest.raises(ValueError, match=re.escape(
      "quantize: cannot tell which axis of 'stack' (shape (2, 64, 8)) is "
      "contracted; only 2-D kernels default to (in, out), blocks along axis "
      "0. Pass quantize(..., delta=delta) with the delta from lora_jax.split "
      "(it knows each adapter's layout), or layouts={'stack': "
      "lora_jax.Layout(batch=..., inputs=..., outputs=...)}, or leave the leaf "
      "out of targets.")):
    lj.quantize(params, "nf4", targets="stack")
  with pytest.raises(ValueError, match=re.escape(
      "quantize: targets: the regex 'nope' matches no leaf path")):
    lj.quantize(params, "nf4", targets="nope")
  with pytest.raises(ValueError, match="scheme must be one of"):
    lj.quantize(params, "fp4", targets="stack")
  with pytest.raises(ValueError, match="even for nf4"):
    lj.quantize(params, "nf4", block_size=5, targets="stack")
  q = lj.quantize(params, "int8", block_size=4, targets="fc/kernel")
  with pytest.raises(ValueError, match=re.escape(
      "quantize: 'fc/kernel' is already quantized (QArray(int8, f32[100,8], "
      "block 4)). To change its scheme or block size, quantize "
      "lora_jax.dequantize(tree) instead")):
    lj.quantize(q, "nf4", block_size=4, targets="fc/kernel")
  with pytest.raises(ValueError, match=re.escape(
      "the layout given for 'stack' has 2 axes but the leaf has shape "
      "(2, 64, 8)")):
    lj.quantize(params, "nf4", targets="stack",
                layouts={"stack": lj.Layout.dense()})


def _mlp():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"l1": {"kernel": jax.random.normal(k[0], (32, 64)) * 0.2,
                   "bias": jnp.zeros(64)},
            "l2": {"kernel": jax.random.normal(k[1], (64, 8)) * 0.2}}

  def fn(p, x):
    return jax.nn.gelu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"][
        "kernel"]
  x = jax.random.normal(k[2], (16, 32))
  return params, fn, x


def test_split_on_a_quantized_tree():
  params, fn, x = _mlp()
  config = lj.LoraConfig(rank=4, targets=r".*kernel")
  qparams = lj.quantize(params, "nf4", block_size=32)
  base, delta = lj.split(qparams, config, jax.random.key(1), apply_fn=fn,
                         example_args=(x,))
  assert base is qparams
  _, want = lj.split(params, config, jax.random.key(1))
  for p, d in lj.adapters(want).items():
    np.testing.assert_array_equal(lj.adapters(delta)[p].a, d.a)
    assert lj.adapters(delta)[p].layout == d.layout
  # DoRA: the magnitude is the norm of the kernel the model sees (dequantized)
  dora = lj.LoraConfig(rank=4, targets=r".*kernel", dora=True)
  _, qd = lj.split(qparams, dora, jax.random.key(1))
  _, fd = lj.split(lj.dequantize(qparams), dora, jax.random.key(1))
  np.testing.assert_allclose(lj.adapters(qd)["l1/kernel"].magnitude,
                             lj.adapters(fd)["l1/kernel"].magnitude, rtol=1e-6)
  with pytest.raises(ValueError, match=re.escape(
      "split: 'l1/kernel' is quantized (QArray(nf4, f32[32,64], block 32)) and "
      "init='pissa' needs its float weights (the factors come from them and "
      "the base becomes the residual). Split the float tree first, then "
      "quantize the residual base: base, delta = lora_jax.split(params, "
      "config, key); qbase = lora_jax.quantize(base, 'nf4', delta=delta).")):
    lj.split(qparams, lj.LoraConfig(rank=4, targets=r".*kernel", init="pissa"),
             jax.random.key(1))


def test_pissa_then_quantize_the_residual():
  params, fn, x = _mlp()
  stacked = {"w": jax.random.normal(jax.random.key(5), (2, 8, 64)) * 0.1}
  base, delta = lj.split({**params, **stacked}, lj.LoraConfig(
      rank=4, targets=r".*kernel|w", init="pissa",
      layouts={"w": lj.Layout((0,), (2,), (1,))}), jax.random.key(1))
  # the stacked kernel is stored (batch, out, in): its layout comes from delta
  qbase = lj.quantize(base, "nf4", block_size=32, delta=delta)
  assert qbase["w"].axis == 2
  merged = lj.merge(qbase, delta)
  want = lj.merge(lj.dequantize(qbase), delta)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), merged,
                                   want))
  # the error of merge(qbase, delta) against the float params is the
  # quantization error of the residual alone
  for path, w in (("l1/kernel", params["l1"]["kernel"]), ("w", stacked["w"])):
    got = dict(lj.leaves_with_paths(merged))[path]
    res = dict(lj.leaves_with_paths(base))[path]
    qerr = np.abs(np.asarray(lj.dequantize(dict(lj.leaves_with_paths(qbase))[
        path])) - np.asarray(res)).max()
    assert np.abs(np.asarray(got) - np.asarray(w)).max() <= qerr * 1.01 + 1e-6


def test_merge_unmerge_and_wrap_merge_on_a_quantized_base():
  params, fn, x = _mlp()
  base, delta = lj.split(params, lj.LoraConfig(rank=4, targets=r".*kernel"),
                         jax.random.key(1))
  delta = jax.tree.map(lambda d: d.replace(b=jnp.full(d.b.shape, 0.1))
                       if isinstance(d, lj.LoraDelta) else d, delta,
                       is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  qbase = lj.quantize(base, "nf4", block_size=32, targets=r".*kernel")
  floats = lj.dequantize(qbase)
  merged = lj.merge(qbase, delta)
  assert not any(isinstance(v, lj.QArray) for v in jax.tree.leaves(
      merged, is_leaf=lambda v: isinstance(v, lj.QArray)))
  for a, b in zip(jax.tree.leaves(merged),
                  jax.tree.leaves(lj.merge(floats, delta))):
    np.testing.assert_array_equal(a, b)
  back = lj.unmerge(merged, delta)
  np.testing.assert_allclose(back["l1"]["kernel"], floats["l1"]["kernel"],
                             atol=1e-6)
  # the merge engine on a quantized base is the same as on its float copy,
  # in value and in the factors' gradient
  apply = lj.wrap(fn, "merge")
  loss = lambda b, d: jnp.sum(apply(b, d, x) ** 2)
  # (inside jit the dequantization fuses into the matmul: float rounding)
  np.testing.assert_allclose(jax.jit(apply)(qbase, delta, x),
                             jax.jit(apply)(floats, delta, x), rtol=1e-5,
                             atol=1e-6)
  gq = jax.jit(jax.grad(loss, argnums=1))(qbase, delta)
  gf = jax.jit(jax.grad(loss, argnums=1))(floats, delta)
  for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gf)):
    np.testing.assert_allclose(a, b, rtol=5e-5, atol=1e-5)


def test_qlora_training_lowers_the_loss():
  params, fn, x = _mlp()
  y = jnp.sin(3 * x[:, :8])
  base, delta = lj.split(params, lj.LoraConfig(rank=8, targets=r".*kernel"),
                         jax.random.key(1))
  qbase = lj.quantize(base, "nf4", block_size=32, double_quant=True,
                      targets=r".*kernel")
  losses = train_mse(lj.wrap(fn, "merge"), qbase, delta, x, y, steps=60)
  assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_orbax_restores_a_quantized_tree_bit_for_bit(tmp_path):
  params, _, _ = _mlp()
  trees = {"nf4": lj.quantize(params, "nf4", block_size=32),
           "int8dq": lj.quantize(params, "int8", block_size=16,
                                 double_quant=True)}
  ckpt = ocp.StandardCheckpointer()
  for name, tree in trees.items():
    ckpt.save(tmp_path / name, tree)
  ckpt.wait_until_finished()
  # restore targets: from the tree itself, or abstractly from the float params
  targets = {"nf4": jax.tree.map(ocp.utils.to_shape_dtype_struct, trees["nf4"]),
             "int8dq": jax.eval_shape(lambda p: lj.quantize(
                 p, "int8", block_size=16, double_quant=True), params)}
  for name, tree in trees.items():
    restored = ckpt.restore(tmp_path / name, targets[name])
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert repr(restored["l1"]["kernel"]) == repr(tree["l1"]["kernel"])
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)


needs_8 = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets "
    "--xla_force_host_platform_device_count=8 before jax starts)")


@needs_8
def test_quantized_kernels_shard_like_the_kernel(tmp_path):
  mesh = make_mesh()
  params = {"w1": _kernel((128, 64)), "w2": _kernel((64, 32), seed=1)}
  specs = {"w1": P("data", "model"), "w2": P(None, "model")}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
             for k, v in params.items()}
  q = lj.quantize(sharded, "nf4", block_size=16, double_quant=True)
  want = lj.quantize(params, "nf4", block_size=16, double_quant=True)
  placed = lambda x, spec: x.sharding.is_equivalent_to(
      NamedSharding(mesh, spec), x.ndim)
  # w1 (128, 64): codes (64, 64) keep P(data, model); absmax (8, 64) too
  assert placed(q["w1"].codes, P("data", "model"))
  assert placed(q["w1"].absmax, P("data", "model"))
  assert placed(q["w1"].absmax_scale, P())
  # w2 (64, 32), blocks of 16: absmax has 4 rows, codes 32: both split
  assert placed(q["w2"].codes, P(None, "model"))
  assert q["w1"].sharding.spec == P("data", "model")
  for k in q:  # the same codes; the absmax mean is a sum in another order
    np.testing.assert_array_equal(q[k].codes, want[k].codes)
    np.testing.assert_allclose(q[k].block_absmax(), want[k].block_absmax(),
                               rtol=1e-6)
  # an absmax axis the mesh does not divide is replicated
  few = lj.quantize({"w": params["w1"]}, "nf4", block_size=64)["w"]
  got = few.shardings(NamedSharding(mesh, P("data", "model")))
  assert got.codes.spec == P("data", "model") and got.absmax.spec == P(
      None, "model")
  # derived from specs alone, for jit / device_put / restore targets
  assert q["w1"].shardings(P("data", "model")).codes == P("data", "model")
  # split puts the factors where it puts those of the float kernel
  cfg = lj.LoraConfig(rank=4, targets="w1|w2")
  _, qdelta = lj.split(q, cfg, jax.random.key(0))
  _, fdelta = lj.split(sharded, cfg, jax.random.key(0))
  for p, d in lj.adapters(fdelta).items():
    assert placed(lj.adapters(qdelta)[p].a, d.a.sharding.spec), p
    assert placed(lj.adapters(qdelta)[p].b, d.b.sharding.spec), p
  # a jitted dequantize on the sharded QArray gives the kernel's placement
  out = jax.jit(lj.dequantize, out_shardings={
      k: NamedSharding(mesh, s) for k, s in specs.items()})(q)
  assert placed(out["w1"], specs["w1"]) and placed(out["w2"], specs["w2"])
  np.testing.assert_allclose(out["w1"], lj.dequantize(q["w1"]), rtol=1e-6)
  # and an orbax restore lands back on the mesh
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "q", q)
  ckpt.wait_until_finished()
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), q,
      {k: q[k].shardings(NamedSharding(mesh, specs[k])) for k in q})
  restored = ckpt.restore(tmp_path / "q", target)
  assert placed(restored["w1"].codes, P("data", "model"))
  np.testing.assert_array_equal(restored["w1"].codes, q["w1"].codes)


def test_an_nf4_base_step_holds_a_third_of_the_float_arguments():
  fn, base, delta, x = tanh_stack(512, 0.05)
  tx = optax.adam(1e-3)
  apply = lj.wrap(fn, "merge")

  def step(state, base, x):
    d, opt = state
    l, g = jax.value_and_grad(lambda d: jnp.sum(apply(base, d, x) ** 2))(d)
    u, opt = tx.update(g, opt, d)
    return (optax.apply_updates(d, u), opt), l
  args = lambda b: jax.jit(step, donate_argnums=0).lower(
      (delta, tx.init(delta)), b, x).compile().memory_analysis(
      ).argument_size_in_bytes
  qbase = lj.quantize(base, "nf4")
  # the step holds the QArrays' bytes in place of the float kernels'
  floats = sum(w.nbytes for w in jax.tree.leaves(base))
  quantized = sum(q.nbytes for q in qbase.values())
  assert quantized == 4 * (512 * 512 // 2 + 4 * 512 * 512 // 64)
  assert args(qbase) == args(base) - floats + quantized
  assert args(qbase) <= 0.35 * args(base), (args(qbase), args(base))


def _frozen_stack(kind):
  """16 frozen 512 x 512 kernels (16 MiB as float32), 64 tokens."""
  ws = [jax.random.normal(jax.random.key(i), (512, 512)) * 0.05
        for i in range(16)]
  if kind == "nf4":
    return [lj.quantize({"w": w}, "nf4")["w"] for w in ws]
  return [w.astype(jnp.bfloat16) for w in ws]


@pytest.mark.parametrize("kind", ["nf4", "bf16"])
def test_frozen_linear_keeps_no_float_copy(kind):
  from lora_jax._src.factored.frozen import frozen_linear
  kernels = _frozen_stack(kind)
  x = jax.random.normal(jax.random.key(99), (64, 512))
  widen = lambda k: (lj.dequantize(k) if isinstance(k, lj.QArray)
                     else k.astype(jnp.float32))

  def loss(kernels, x, frozen):
    h = x
    for k in kernels:
      h = jnp.tanh(frozen_linear(jnp.matmul, h, k) if frozen
                   else h @ widen(k))
    return jnp.sum(h ** 2)
  grad = lambda frozen: jax.jit(jax.grad(
      lambda k, x: loss(k, x, frozen), argnums=1))
  np.testing.assert_allclose(grad(True)(kernels, x), grad(False)(kernels, x),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss(kernels, x, True), loss(kernels, x, False),
                             rtol=1e-6)
  temp = lambda frozen: grad(frozen).lower(kernels, x).compile(
  ).memory_analysis().temp_size_in_bytes
  copies = 16 * 512 * 512 * 4
  # widened in the step, XLA:CPU keeps every float copy (and more); at the
  # point of use, tied to the activation, about one at a time
  assert temp(False) >= copies, temp(False)
  assert temp(True) <= 0.25 * copies, (temp(True), copies)


def _quantized_paths(tree):
  return {p for p, x in lj.leaves_with_paths(tree) if isinstance(x, lj.QArray)}


def _tunix_like():
  """A decoder layer written as tunix writes Qwen3/Gemma3: attention weights
  are einsum params named `w` ((d, heads, head_dim), (heads, head_dim, d)),
  the MLP Dense `kernel`s, an embedding lookup and an LM head `w`."""
  shapes = {"embed": (32, 16), "attn/q/w": (16, 4, 8), "attn/k/w": (16, 2, 8),
            "attn/v/w": (16, 2, 8), "attn/o/w": (4, 8, 16),
            "mlp/gate/kernel": (16, 32), "mlp/down/kernel": (32, 16),
            "head/w": (16, 32)}
  rng = np.random.default_rng(0)
  params = {}
  for p, shape in shapes.items():
    x = jnp.asarray(0.2 * rng.standard_normal(shape), jnp.float32)
    node = params
    *parents, last = p.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = x

  def fn(p, ids):
    x = p["embed"][ids]
    a = p["attn"]
    q = jnp.einsum("btd,dnh->btnh", x, a["q"]["w"])
    k = jnp.repeat(jnp.einsum("btd,dkh->btkh", x, a["k"]["w"]), 2, axis=2)
    v = jnp.repeat(jnp.einsum("btd,dkh->btkh", x, a["v"]["w"]), 2, axis=2)
    s = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
    x = x + jnp.einsum("btnh,nhd->btd", jnp.einsum("bnts,bsnh->btnh", s, v),
                       a["o"]["w"])
    m = p["mlp"]
    x = x + jax.nn.gelu(x @ m["gate"]["kernel"]) @ m["down"]["kernel"]
    return jnp.einsum("btd,dv->btv", x, p["head"]["w"])
  return params, fn, (jnp.asarray(rng.integers(0, 32, (2, 5))),)


def test_all_linear_selects_what_split_adapts():
  params, fn, args = _tunix_like()
  _, delta = lj.split(params, lj.LoraConfig(rank=2, targets="all-linear"),
                      jax.random.key(0), apply_fn=fn, example_args=args)
  adapted = set(lj.adapters(delta))
  assert adapted == {"attn/q/w", "attn/k/w", "attn/v/w", "attn/o/w",
                     "mlp/gate/kernel", "mlp/down/kernel"}
  q = lj.quantize(params, "nf4", block_size=8, targets="all-linear",
                  apply_fn=fn, example_args=args)
  assert _quantized_paths(q) == adapted  # not the lookup, not the LM head
  # blocks along each kernel's contracted axis, as traced: q along d (0),
  # o (heads, head_dim, d) along head_dim (1)
  assert q["attn"]["q"]["w"].axis == 0 and q["attn"]["o"]["w"].axis == 1
  with pytest.raises(ValueError, match=re.escape(
      "quantize: targets='all-linear' needs apply_fn and example_args: it "
      "selects the kernels the model uses as matmul / einsum weights, "
      "whatever their names")):
    lj.quantize(params, "nf4", block_size=8, targets="all-linear")


def test_targets_delta_quantizes_exactly_the_adapted_kernels():
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = {"emb": w(64, 32), "attn": {"qkv": w(32, 3, 64)},
            "mlp": {"kernel": w(64, 32)}, "head": {"kernel": w(32, 64)}}
  cfg = lj.LoraConfig(rank=2, targets=["attn/qkv", "mlp/kernel"],
                      layouts={"attn/qkv": lj.Layout((1,), (0,), (2,))})
  _, delta = lj.split(params, cfg, jax.random.key(1))
  q = lj.quantize(params, "int8", block_size=16, targets=delta)
  assert _quantized_paths(q) == {"attn/qkv", "mlp/kernel"}
  assert q["attn"]["qkv"].axis == 0 and q["mlp"]["kernel"].axis == 0
  assert q["emb"] is params["emb"] and q["head"]["kernel"] is params["head"][
      "kernel"]
  with pytest.raises(ValueError, match=re.escape(
      "quantize: targets is a delta adapting ['attn/qkv', 'mlp/kernel'], "
      "which the tree has no leaf at. Pass the base the delta was split "
      "from.")):
    lj.quantize({"other": params["emb"]}, "int8", block_size=16,
                targets=delta)


def test_block_size_must_be_a_positive_int():
  w = {"w": jnp.ones((64, 4))}
  q = lj.quantize(w, "nf4", block_size=np.int64(32))
  assert q["w"].block_size == 32 and type(q["w"].block_size) is int
  for bad in (True, np.bool_(True), 32.0, "32", jnp.int32(32)):
    with pytest.raises(TypeError, match=re.escape(
        f"quantize: block_size must be a positive int (Python or NumPy "
        f"integer), got {bad!r} of type {type(bad).__name__}.")):
      lj.quantize(w, "int8", block_size=bad)
  for bad in (0, -4, np.int32(-2)):
    with pytest.raises(ValueError, match=re.escape(
        f"quantize: block_size must be a positive integer (even for nf4, two "
        f"codes per byte), got {int(bad)}.")):
      lj.quantize(w, "int8", block_size=bad)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_non_finite_weights(scheme):
  w = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
  bad = w.copy()
  bad[5, 1], bad[9, 3], bad[12, 0] = np.inf, -np.inf, np.nan
  w, bad = jnp.asarray(w), jnp.asarray(bad)
  with pytest.raises(ValueError, match=re.escape(
      "quantize: 'fc/kernel' (shape (16, 4)) holds 3 non-finite values (NaN "
      "or +-inf), the first at index (5, 1); a block's absmax would be "
      "non-finite and the whole block would dequantize to NaN. Fix those "
      "weights (e.g. jnp.nan_to_num) or leave the leaf out of targets.")):
    lj.quantize({"fc": {"kernel": bad}}, scheme, block_size=4)
  # Traced (nothing to check): each block holding one is NaN throughout, no
  # sign flip, no inf; the other blocks are as without it.
  deq = jax.jit(lambda w: lj.dequantize(
      lj.quantize({"w": w}, scheme, block_size=4)))(bad)["w"]
  clean = lj.dequantize(lj.quantize({"w": w}, scheme, block_size=4))["w"]
  blocks = np.zeros((16, 4), bool)
  blocks[4:8, 1] = blocks[8:12, 3] = blocks[12:16, 0] = True
  assert np.isnan(np.asarray(deq)[blocks]).all()
  np.testing.assert_array_equal(np.asarray(deq)[~blocks],
                                np.asarray(clean)[~blocks])
  dq = jax.jit(lambda w: lj.dequantize(lj.quantize(
      {"w": w}, scheme, block_size=4, double_quant=True)))(bad)["w"]
  assert np.isnan(np.asarray(dq)).all()  # double quant: the whole kernel
  with pytest.raises(ValueError, match="holds 3 non-finite values"):
    lj.quantize({"fc": {"kernel": bad}}, scheme, block_size=4,
                double_quant=True)
