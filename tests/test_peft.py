"""PEFT's adapter format: save_peft / load_peft / check_vllm (the
safetensors reader and writer: test_safetensors.py).

The first part needs no PyTorch: the save -> load round trip (bitwise), PEFT's arithmetic written out in
numpy from the files alone against lj.merge, and every error message. The
second part runs against the real thing (torch, peft, transformers' Flax and
PyTorch Llama and GPT-2): both directions, to 1e-4 on logits.
"""

import copy
import json
import math
import os
import re
import warnings
import zlib

from helpers import safetensors_bytes
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tunix_models

import lora_jax as lj
from lora_jax._src import safetensors as st
from lora_jax._src.peft import pattern_key

# ------------------------------------------------------- a Llama-like tree


def _params(seed=0):
  """Transformers-Flax-style names: 2-D (in, out) kernels, a transposed
  (out, in) kernel, an N-D attention kernel, norms and an embedding."""
  rng = np.random.default_rng(seed)
  w = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
  layer = lambda: {
      "self_attn": {"q_proj": {"kernel": w(8, 8)}, "v_proj": {"kernel": w(8, 4)},
                    "o_proj": {"kernel": w(8, 8)}},
      "mlp": {"c_proj": {"kernel": w(6, 8)}, "up": {"kernel": w(8, 6)}},
      "attn": {"c_proj": {"kernel": w(8, 8)}},
      "input_layernorm": {"weight": jnp.ones(8)}}
  params = {"model": {"embed_tokens": {"embedding": w(16, 8)},
                      "layers": {"0": layer(), "1": layer()},
                      "norm": {"weight": jnp.ones(8)}}}
  params["model"]["layers"]["0"]["c_attn"] = {"kernel": w(12, 8)}     # (out, in)
  params["model"]["layers"]["0"]["query"] = {"kernel": w(8, 2, 3)}  # (in, h, d)
  return params


LAYOUTS = {r".*/c_attn/kernel": lj.Layout.transposed(),
           r".*/query/kernel": lj.Layout((), (0,), (1, 2))}
TARGETS = r".*/(q_proj|v_proj|c_proj|c_attn|query)/kernel"

CASES = {
    "lora": dict(rank=4, alpha=8.0),
    "rslora": dict(rank=4, alpha=6.0, rslora=True),
    "dora": dict(rank=3, alpha=5.0, dora=True),
    "pattern": dict(rank=4, alpha=8.0, rank_pattern={r".*/v_proj/kernel": 2},
                    alpha_pattern={r".*/1/.*/c_proj/kernel": 3.0,
                                   r".*/v_proj/kernel": 5.0}),
}


def _random_delta(params, config, seed=1):
  _, delta = lj.split(params, config, jax.random.key(seed))
  return _fill(delta, seed)


def _fill(delta, seed=1):
  """Random non-zero factors (and magnitudes), each adapter its own."""
  key = jax.random.key(seed + 1)

  def fill(path, d):
    if not isinstance(d, lj.LoraDelta):
      return d
    k = jax.random.fold_in(key, zlib.crc32(path.encode()))
    ka, kb, km = jax.random.split(k, 3)
    out = d.replace(a=jax.random.normal(ka, d.a.shape) * 0.5,
                    b=jax.random.normal(kb, d.b.shape) * 0.5)
    if d.magnitude is not None:
      out = out.replace(magnitude=d.magnitude * (
          1 + 0.2 * jax.random.normal(km, d.magnitude.shape)))
    return out
  return lj.map_with_paths(fill, delta,
                           is_leaf=lambda x: x is None or isinstance(
                               x, lj.LoraDelta))


def _config(case):
  return lj.LoraConfig(targets=TARGETS, layouts=LAYOUTS, **CASES[case])


def _peft_regex(key, module):
  # PEFT 0.21's rule for rank_pattern / alpha_pattern keys, written out.
  return re.match(rf"(.*\.)?({key})$", module) is not None


def _peft_merge(directory, torch_weights):
  """PEFT's arithmetic from the two files alone: per module, W + s B A (DoRA:
  m * V / ||V|| per output row), s = alpha / r (or / sqrt r) as the
  patterns resolve for that module."""
  cfg = json.load(open(os.path.join(directory, "adapter_config.json")))
  tensors, _ = st.load_file(os.path.join(directory,
                                         "adapter_model.safetensors"))
  out = dict(torch_weights)
  for key in tensors:
    if not key.endswith(".lora_A.weight"):
      continue
    module = key[len("base_model.model."):-len(".lora_A.weight")]
    first = lambda pat, module=module: next(
        (k for k in pat if _peft_regex(k, module)), None)
    rk, ak = first(cfg["rank_pattern"]), first(cfg["alpha_pattern"])
    r = cfg["rank_pattern"][rk] if rk else cfg["r"]
    alpha = cfg["alpha_pattern"][ak] if ak else cfg["lora_alpha"]
    s = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
    a = tensors[key].astype(np.float64)
    b = tensors[key.replace("lora_A", "lora_B")].astype(np.float64)
    assert a.shape[0] == r and b.shape[1] == r
    v = out[module] + s * b @ a
    if cfg["use_dora"]:
      m = tensors[f"base_model.model.{module}.lora_magnitude_vector"]
      v = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
    out[module] = v
  return out


def _torch_view(params, delta):
  """{module: (out, in) float64 weight} of every adapted kernel."""
  ads = lj.adapters(delta)
  return {".".join(p.split("/")[:-1]): np.asarray(
      ads[p].layout.to_out_in(x)[0], np.float64)
          for p, x in lj.leaves_with_paths(params) if p in ads}


@pytest.mark.filterwarnings("ignore:save_peft. a vLLM server")
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_then_load_is_bitwise_and_peft_arithmetic_equals_merge(
    case, tmp_path):
  params, config = _params(), _config(case)
  delta = _random_delta(params, config)
  lj.save_peft(tmp_path, delta, config)
  base, loaded, cfg = lj.load_peft(tmp_path, params, layouts=LAYOUTS)
  assert base is params
  want, got = lj.adapters(delta), lj.adapters(loaded)
  assert sorted(want) == sorted(got) and len(want) == 10
  for p, d in want.items():
    g = got[p]
    assert (g.layout, g.scale, g.rank, g.dropout) == (
        d.layout, d.scale, d.rank, d.dropout), p
    assert np.asarray(g.a).tobytes() == np.asarray(d.a).tobytes(), p
    assert np.asarray(g.b).tobytes() == np.asarray(d.b).tobytes(), p
    assert (g.magnitude is None) == (d.magnitude is None)
    if d.magnitude is not None:
      assert np.asarray(g.magnitude).tobytes() == np.asarray(
          d.magnitude).tobytes()
    assert cfg.scale_for(p) == d.scale and cfg.rank_for(p) == d.rank
  assert (cfg.rank, cfg.alpha, cfg.rslora, cfg.dora) == (
      config.rank, config.alpha, config.rslora, config.dora)
  # PEFT's arithmetic, read off the files, is lj.merge in torch's view.
  merged = _torch_view(lj.merge(params, delta), delta)
  peft = _peft_merge(tmp_path, _torch_view(params, delta))
  for module, w in merged.items():
    np.testing.assert_allclose(peft[module], w, atol=2e-6, err_msg=module)


def test_adapter_config_fields(tmp_path):
  params, config = _params(), _config("pattern")
  delta = _random_delta(params, config)
  with pytest.warns(UserWarning, match=r"own scale \(4 of them, e.g. "
                    r"'model.layers.0.self_attn.v_proj'\)"):
    lj.save_peft(tmp_path, delta, config)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  # "c_proj" alone would also pick nothing else here, so short names win;
  # v_proj's own rank and alphas become module-name regexes.
  assert cfg["target_modules"] == ["c_attn", "c_proj", "q_proj", "query",
                                   "v_proj"]
  assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"],
          cfg["use_dora"], cfg["bias"], cfg["fan_in_fan_out"]) == (
              "LORA", 4, 8, False, False, "none", False)
  assert cfg["rank_pattern"] == {"v_proj": 2}
  assert cfg["alpha_pattern"] == {"v_proj": 5.0,
                                  r"1\.attn\.c_proj|1\.mlp\.c_proj": 3.0}
  tensors, meta = st.load_file(tmp_path / "adapter_model.safetensors")
  assert meta == {"format": "pt"}
  key = "base_model.model.model.layers.0.query"
  assert tensors[key + ".lora_A.weight"].shape == (4, 8)
  assert tensors[key + ".lora_B.weight"].shape == (6, 4)  # (2 heads * 3)
  assert tensors["base_model.model.model.layers.0.c_attn.lora_A.weight"
                 ].shape == (4, 8)  # (r, in) of the (out=12, in=8) kernel


def test_target_modules_are_exact(tmp_path):
  params = _params()
  # Only the attention c_proj: "c_proj" would also pick mlp.c_proj.
  config = lj.LoraConfig(rank=2, targets=r".*/attn/c_proj/kernel")
  _, delta = lj.split(params, config, jax.random.key(0))
  lj.save_peft(tmp_path, delta, config)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["target_modules"] == ["attn.c_proj"]
  # A delta without its None slots (only adapters) knows no other module:
  # the full names are the only safe target_modules.
  only = {"model": {"layers": {i: {"attn": {"c_proj": {"kernel": d}}}
                               for i, d in (("0", delta["model"]["layers"]["0"]
                                             ["attn"]["c_proj"]["kernel"]),)}}}
  lj.save_peft(tmp_path, only, config)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["target_modules"] == ["model.layers.0.attn.c_proj"]
  assert cfg["lora_alpha"] == 16 and isinstance(cfg["lora_alpha"], int)


def test_nested_module_names_stay_exact(tmp_path):
  # "q" is a '.'-suffix of "enc.q": no list of suffixes, nor a plain pattern
  # key, can pick one without the other.
  params = {"q": {"kernel": jnp.ones((4, 4))},
            "enc": {"q": {"kernel": jnp.ones((4, 4))}}}
  config = lj.LoraConfig(rank=4, targets=r"q/kernel")
  _, delta = lj.split(params, config, jax.random.key(0))
  lj.save_peft(tmp_path, delta, config)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["target_modules"] == "q"  # a string is full-matched by PEFT
  config = lj.LoraConfig(rank=4, targets=".*kernel", rank_pattern={"q/kernel": 2})
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.warns(UserWarning, match=r"own scale \(1 of them, e.g. 'q'\)"):
    lj.save_peft(tmp_path, delta, config)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["rank_pattern"] == {"^q": 2}
  assert _peft_regex("^q", "q") and not _peft_regex("^q", "enc.q")
  _, loaded, _ = lj.load_peft(tmp_path, params)
  assert (loaded["q"]["kernel"].rank, loaded["enc"]["q"]["kernel"].rank) == (2, 4)


def test_pattern_keys_resolve_like_peft():
  assert pattern_key([r"q_proj"], "model.layers.0.q_proj") == "q_proj"
  assert pattern_key([r"1\.q_proj"], "model.layers.11.q_proj") is None
  assert pattern_key([r"a", r"layers\.0\.a"], "m.layers.0.a") == "a"


def test_fold_scales_gives_one_scale_and_the_same_model(tmp_path):
  params, config = _params(), _config("pattern")
  delta = _random_delta(params, config)
  with pytest.warns(UserWarning, match="rank_pattern/alpha_pattern: vLLM "
                    "scales every module by lora_alpha/r"):
    lj.save_peft(tmp_path / "plain", delta, config)
  assert lj.save_peft(tmp_path / "fold", delta, config, fold_scales=True) == []
  cfg = json.load(open(tmp_path / "fold" / "adapter_config.json"))
  assert cfg["rank_pattern"] == {"v_proj": 2}
  assert cfg["alpha_pattern"] == {"v_proj": 4.0}  # 2 * (8 / 4): scale 2
  merged = _torch_view(lj.merge(params, delta), delta)
  peft = _peft_merge(tmp_path / "fold", _torch_view(params, delta))
  for module, w in merged.items():
    np.testing.assert_allclose(peft[module], w, atol=2e-6, err_msg=module)
  assert lj.check_vllm(tmp_path / "fold") == []


def test_stacked_kernels_become_one_module_per_layer(tmp_path):
  rng = np.random.default_rng(3)
  stacked = {"layers": {"q_proj": {"kernel": jnp.asarray(
      rng.normal(size=(2, 8, 4)), jnp.float32)}}}
  config = lj.LoraConfig(rank=2, targets=".*kernel",
                         layouts={".*": lj.Layout((0,), (1,), (2,))})
  delta = _random_delta(stacked, config)
  with pytest.raises(lj.PeftFormatError) as e:
    lj.save_peft(tmp_path, delta, config)
  assert str(e.value).startswith(
      "'layers/q_proj/kernel' has batch axes (kernel shape (2, 8, 4), layout "
      "Layout(batch=(0,), inputs=(1,), outputs=(2,))): it holds 2 kernels "
      "(stacked layers or experts) while PEFT has one module per kernel. Pass "
      "module_names that maps 'layers/q_proj/kernel[0]' to the module of "
      "that index")
  names = [(r"layers/(\w+)/kernel\[(\d+)\]", r"model.layers.\2.self_attn.\1")]
  lj.save_peft(tmp_path, delta, config, module_names=names)
  # The file loads onto the same model with its layers unstacked.
  w = stacked["layers"]["q_proj"]["kernel"]
  flat = {"model": {"layers": {str(i): {"self_attn": {"q_proj": {
      "kernel": w[i]}}} for i in range(2)}}}
  _, loaded, _ = lj.load_peft(tmp_path, flat)
  d = delta["layers"]["q_proj"]["kernel"]
  for i in range(2):
    g = loaded["model"]["layers"][str(i)]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(g.a, d.a[i])
    np.testing.assert_array_equal(g.b, d.b[i])
    assert g.scale == d.scale
  # ... and the stacked file's arithmetic is merge's, layer by layer.
  merged = lj.merge(stacked, delta)["layers"]["q_proj"]["kernel"]
  merged_flat = lj.merge(flat, loaded)["model"]["layers"]
  for i in range(2):
    np.testing.assert_allclose(
        merged_flat[str(i)]["self_attn"]["q_proj"]["kernel"], merged[i],
        atol=1e-6)
  # ... and back onto the stacked kernel, named per entry the same way.
  stacked_layout = {".*": lj.Layout((0,), (1,), (2,))}
  _, back, cfg = lj.load_peft(tmp_path, stacked, module_names=names,
                              layouts=stacked_layout)
  g = back["layers"]["q_proj"]["kernel"]
  assert np.asarray(g.a).tobytes() == np.asarray(d.a).tobytes()
  assert np.asarray(g.b).tobytes() == np.asarray(d.b).tobytes()
  assert (g.layout, g.scale, cfg.rank) == (d.layout, d.scale, 2)
  # Each error of a stacked load names what to do.
  with pytest.raises(lj.PeftFormatError) as e:
    lj.load_peft(tmp_path, {"model": {"layers": {
        str(i): {"self_attn": {"q_proj": {"kernel": w}}} for i in range(2)}}},
                 layouts=stacked_layout)
  assert str(e.value).endswith(
      "adapter_model.safetensors: 'base_model.model.model.layers.0.self_attn."
      "q_proj.lora_A.weight' would adapt 'model/layers/0/self_attn/q_proj/"
      "kernel', a kernel with batch axes (0,) (shape (2, 8, 4), layout "
      "Layout(batch=(0,), inputs=(1,), outputs=(2,))), but module_names named"
      " it as one kernel. Name each entry of its batch axes \"<path>[i]\" in "
      "module_names (e.g. [(r'.*/(\\w+)/kernel\\[(\\d+)\\]', "
      "r'model.layers.\\2.\\1')]), or give it a layout whose batch axes "
      "lead (layouts=).")
  three = {"layers": {"q_proj": {"kernel": jnp.concatenate([w, w[:1]])}}}
  with pytest.raises(lj.PeftFormatError) as e:
    lj.load_peft(tmp_path, three, module_names=names, layouts=stacked_layout)
  assert str(e.value).endswith(
      "adapter_model.safetensors: 'layers/q_proj/kernel' is a stack of 3 "
      "kernels, but the file has no module for 'layers/q_proj/kernel[2]' "
      "('model.layers.2.self_attn.q_proj'); one lora_jax adapter covers the "
      "whole stack, so every entry needs its module.")
  both = names + [(r"layers/q_proj/kernel", "model.layers.0.self_attn.q_proj")]
  with pytest.raises(lj.PeftFormatError, match="is the name of several "
                     r"leaves \['layers/q_proj/kernel', 'layers/q_proj/"
                     r"kernel\[0\]'\]"):
    lj.load_peft(tmp_path, stacked, module_names=[both[1], both[0]])
  twice = [(r"layers/q_proj/kernel", "foo")] + names
  extra = tmp_path / "extra"
  lj.save_peft(extra, delta, config, module_names=names)
  _edit(extra, tensors=lambda t: {
      **t, "base_model.model.foo.lora_A.weight": np.zeros((2, 8), np.float32),
      "base_model.model.foo.lora_B.weight": np.zeros((4, 2), np.float32)})
  with pytest.raises(lj.PeftFormatError) as e:
    lj.load_peft(extra, stacked, module_names=twice)
  assert str(e.value).endswith(
      "adapter_model.safetensors: 'layers/q_proj/kernel' is adapted both as "
      "one module and per stacked entry (['foo', 'model.layers.0.self_attn."
      "q_proj', 'model.layers.1.self_attn.q_proj']); module_names must name it"
      " one way.")
  _edit(tmp_path, {"rank_pattern": {"layers.1.self_attn.q_proj": 3}})
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "shape (2, 8), but adapter_config.json gives "
      "'model.layers.1.self_attn.q_proj' rank 3 (field rank_pattern); want "
      "(3, in).")):
    lj.load_peft(tmp_path, stacked, module_names=names, layouts=stacked_layout)
  _edit(tmp_path, {"rank_pattern": {}, "alpha_pattern": {
      "layers.1.self_attn.q_proj": 3}})
  with pytest.raises(lj.PeftFormatError) as e:
    lj.load_peft(tmp_path, stacked, module_names=names, layouts=stacked_layout)
  assert str(e.value).endswith(
      "adapter_model.safetensors: the modules of the stacked kernel "
      "'layers/q_proj/kernel' have different (rank, alpha) [(2, 3.0), (2, "
      "16.0)]; one lora_jax adapter has one rank and one scale for its whole "
      "stack.")


def test_module_names_as_callable_and_pairs(tmp_path):
  params = {"enc": {"attn": {"q": {"kernel": jnp.ones((4, 4))}}}}
  config = lj.LoraConfig(rank=2)
  delta = _random_delta(params, config)
  lj.save_peft(tmp_path, delta, config,
               module_names=lambda p: "encoder." + p.replace("/kernel", "")
               .replace("/", "."))
  keys = st.load_file(tmp_path / "adapter_model.safetensors")[0]
  assert sorted(keys) == ["base_model.model.encoder.enc.attn.q.lora_A.weight",
                          "base_model.model.encoder.enc.attn.q.lora_B.weight"]
  pairs = [(r"enc/attn/(\w)/kernel", r"encoder.enc.attn.\1")]
  _, loaded, _ = lj.load_peft(tmp_path, params, module_names=pairs)
  np.testing.assert_array_equal(loaded["enc"]["attn"]["q"]["kernel"].b,
                                delta["enc"]["attn"]["q"]["kernel"].b)


# --------------------------------------------------------------- save errors


def test_save_errors(tmp_path):
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
  config = lj.LoraConfig(rank=2)
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.raises(TypeError, match="save_peft expects a lora_jax.LoraConfig"
                     ", got {'rank': 2}"):
    lj.save_peft(tmp_path, delta, {"rank": 2})
  with pytest.raises(lj.PeftFormatError, match="save_peft: the delta holds no "
                     "adapter."):
    lj.save_peft(tmp_path, {"a": None}, config)
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "module_names gives the PEFT module name 'same' to more than one adapter "
      "(['a/kernel', 'b/kernel']); each torch module holds one adapter. Fix "
      "module_names.")):
    lj.save_peft(tmp_path, delta, config, module_names=lambda p: "same")
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "module_names gave '' for 'a/kernel'; PEFT needs a non-empty torch module"
      " name such as 'model.layers.0.self_attn.q_proj'.")):
    lj.save_peft(tmp_path, delta, config, module_names=lambda p: "")
  with pytest.raises(lj.PeftFormatError, match="module_names gave '' for "
                     "'kernel'"):
    lj.save_peft(tmp_path, lj.split({"kernel": jnp.ones((2, 2))}, config,
                                    jax.random.key(0))[1], config)
  mixed = {"a": {"kernel": delta["a"]["kernel"].replace(
      magnitude=jnp.ones(4))}, "b": delta["b"]}
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "save_peft: 'a/kernel' is a DoRA adapter but 'b/kernel' is not; PEFT's "
      "use_dora holds for every module of an adapter. Save the two kinds as "
      "two adapters.")):
    lj.save_peft(tmp_path, mixed, config)
  with pytest.raises(TypeError, match="module_names must be a preset name "
                     "\\('transformers', 'tunix-qwen3', 'tunix-llama3', "
                     "'tunix-gemma3'\\), a callable path -> name or a list of "
                     "\\(regex, replacement\\) pairs, got 3"):
    lj.save_peft(tmp_path, delta, config, module_names=3)
  with pytest.raises(ValueError, match=re.escape(
      "save_peft: extra_config cannot set ['lora_alpha', 'r']: they describe "
      "the weights")):
    lj.save_peft(tmp_path, delta, config, extra_config={"r": 1, "lora_alpha": 2})
  lj.save_peft(tmp_path, delta, config, extra_config={
      "task_type": "CAUSAL_LM", "fan_in_fan_out": True})
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert (cfg["task_type"], cfg["fan_in_fan_out"]) == ("CAUSAL_LM", True)


# ------------------------------------------------- kernels, names, presets


def test_a_2d_bias_is_not_a_kernel_mha_round_trip(tmp_path):
  """Flax MultiHeadDotProductAttention: DenseGeneral's (heads, head_dim)
  biases sit beside their kernels under one module name; they are no
  kernel, so save -> load gives the same adapters and the same outputs."""
  import flax.linen as nn
  mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  params = mha.init(jax.random.key(1), x)["params"]
  assert params["key"]["bias"].shape == (2, 4)
  f = jax.jit(lambda p, x: mha.apply({"params": p}, x))
  config = lj.LoraConfig(rank=2, alpha=4.0, targets=r".*/kernel")
  _, delta = lj.split(params, config, jax.random.key(2), f, (x,))
  delta = _fill(delta)
  assert lj.save_peft(tmp_path, delta, config) == []
  keys = sorted(st.load_file(tmp_path / "adapter_model.safetensors")[0])
  assert keys == [f"base_model.model.{m}.lora_{t}.weight"
                  for m in ("key", "out", "query", "value") for t in "AB"]
  want = f(lj.merge(params, delta), x)
  assert float(jnp.abs(want - f(params, x)).max()) > 1e-2
  layouts = {n: lj.adapters(delta)[n].layout for n in lj.adapters(delta)}
  for kw in (dict(apply_fn=f, example_args=(x,)),  # discovery says so
             dict(layouts={re.escape(p): v for p, v in layouts.items()})):
    _, loaded, cfg = lj.load_peft(tmp_path, params, **kw)
    got = lj.adapters(loaded)
    assert sorted(got) == ["key/kernel", "out/kernel", "query/kernel",
                           "value/kernel"]
    for p, d in lj.adapters(delta).items():
      assert got[p].layout == d.layout and got[p].scale == d.scale == 2.0
      assert np.asarray(got[p].a).tobytes() == np.asarray(d.a).tobytes(), p
      assert np.asarray(got[p].b).tobytes() == np.asarray(d.b).tobytes(), p
    np.testing.assert_array_equal(f(lj.merge(params, loaded), x), want)


def test_save_peft_refuses_two_leaves_under_one_module_name(tmp_path):
  # tunix's MoE layer: expert weights are bare parameters of one module, so
  # the default name (leaf name dropped) is 'layers.0.mlp' for all three.
  params = {"layers": {"0": {"mlp": {
      "gate_proj": jnp.ones((4, 6)), "up_proj": jnp.ones((4, 6)),
      "down_proj": jnp.ones((6, 4)), "bias": jnp.ones((4, 6))}}}}
  config = lj.LoraConfig(rank=2, targets=".*/gate_proj")
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.raises(lj.PeftFormatError) as e:
    lj.save_peft(tmp_path, delta, config)
  assert str(e.value) == (
      "module_names gives the PEFT module name 'layers.0.mlp' to the adapted "
      "leaf 'layers/0/mlp/gate_proj' and to the leaf 'layers/0/mlp/"
      "down_proj'; a torch module holds one weight, so PEFT would put the "
      "adapter on the wrong one. Pass module_names that gives each kernel its "
      "own module (a preset such as 'tunix-qwen3', (regex, replacement) pairs "
      "or a callable).")
  assert not os.listdir(tmp_path)
  names = [(r"layers/(\d+)/mlp/(\w+)", r"model.layers.\1.mlp.\2")]
  assert lj.save_peft(tmp_path, delta, config, module_names=names) == []
  # Two adapters under one name: both named.
  config = lj.LoraConfig(rank=2, targets=".*_proj")
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "module_names gives the PEFT module name 'm' to more than one adapter "
      "(['layers/0/mlp/down_proj', 'layers/0/mlp/gate_proj']); each torch "
      "module holds one adapter. Fix module_names.")):
    lj.save_peft(tmp_path, delta, config, module_names=lambda p: "m")


def _tunix_params(gemma=False):
  rng = np.random.default_rng(0)
  w = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
  attn = ({"q_einsum": {"w": w(4, 8, 2)}, "kv_einsum": {"w": w(2, 2, 8, 2)},
           "attn_vec_einsum": {"w": w(4, 2, 8)}, "_key_norm": {"scale": w(2)}}
          if gemma else
          {"q_proj": {"w": w(8, 4, 2)}, "k_proj": {"w": w(8, 2, 2)},
           "o_proj": {"w": w(4, 2, 8)}, "k_norm": {"w": w(2)}})
  return {"embedder": {"input_embedding": w(16, 8)},
          "layers": {"0": {"attn": attn, "mlp": {
              "gate_proj": {"kernel": w(8, 6)},
              "down_proj": {"kernel": w(6, 8)}}}},
          **({} if gemma else {"lm_head": {"w": w(8, 16)}})}


TUNIX_LAYOUTS = {r".*/(q_proj|k_proj)/w": lj.Layout((), (0,), (1, 2)),
                 r".*/o_proj/w": lj.Layout((), (0, 1), (2,))}
GEMMA_LAYOUTS = {r".*/q_einsum/w": lj.Layout((), (1,), (0, 2)),
                 r".*/kv_einsum/w": lj.Layout((), (2,), (0, 1, 3)),
                 r".*/attn_vec_einsum/w": lj.Layout((), (0, 1), (2,))}


def test_module_name_presets(tmp_path):
  """The presets name tunix's leaves as transformers' torch modules; a fused
  kv_einsum becomes k_proj and v_proj (lora_B split, lora_A shared)."""
  config = lj.LoraConfig(rank=2, targets=r".*/(w|kernel)",
                         exclude=".*(norm|embedding).*", layouts=TUNIX_LAYOUTS)
  for preset in ("tunix-qwen3", "tunix-llama3"):
    params = _tunix_params()
    delta = _random_delta(params, config)
    lj.save_peft(tmp_path, delta, config, module_names=preset)
    tensors = st.load_file(tmp_path / "adapter_model.safetensors")[0]
    mods = sorted({k[len("base_model.model."):-len(".lora_A.weight")]
                   for k in tensors if k.endswith(".lora_A.weight")})
    assert mods == ["lm_head", "model.layers.0.mlp.down_proj",
                    "model.layers.0.mlp.gate_proj",
                    "model.layers.0.self_attn.k_proj",
                    "model.layers.0.self_attn.o_proj",
                    "model.layers.0.self_attn.q_proj"], preset
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[q + ".lora_A.weight"].shape == (2, 8)  # (r, embed)
    assert tensors[q + ".lora_B.weight"].shape == (8, 2)  # (heads*head_dim, r)
    _, back, _ = lj.load_peft(tmp_path, params, module_names=preset,
                              layouts=TUNIX_LAYOUTS)
    for p, d in lj.adapters(delta).items():
      np.testing.assert_array_equal(lj.adapters(back)[p].b, d.b)
  params = _tunix_params(gemma=True)
  config = lj.LoraConfig(rank=2, targets=r".*/(w|kernel)",
                         exclude=".*(norm|embedding).*", layouts=GEMMA_LAYOUTS)
  delta = _random_delta(params, config)
  lj.save_peft(tmp_path, delta, config, module_names="tunix-gemma3")
  tensors = st.load_file(tmp_path / "adapter_model.safetensors")[0]
  m = "base_model.model.model.layers.0.self_attn."
  assert sorted(k[len(m):] for k in tensors if k.startswith(m)) == [
      f"{p}_proj.lora_{t}.weight" for p in "koqv" for t in "AB"]
  d = delta["layers"]["0"]["attn"]["kv_einsum"]["w"]  # b (r, 2, K, H)
  for i, p in enumerate("kv"):
    np.testing.assert_array_equal(tensors[f"{m}{p}_proj.lora_A.weight"],
                                  np.asarray(d.a).T)
    np.testing.assert_array_equal(tensors[f"{m}{p}_proj.lora_B.weight"],
                                  np.asarray(d.b)[:, i].reshape(2, 4).T)
  # PEFT's arithmetic on k_proj and v_proj is merge's on kv_einsum.
  merged = lj.merge(params, delta)["layers"]["0"]["attn"]["kv_einsum"]["w"]
  w0 = params["layers"]["0"]["attn"]["kv_einsum"]["w"]
  for i, p in enumerate("kv"):
    a, b = (tensors[f"{m}{p}_proj.lora_{t}.weight"] for t in "AB")
    want = np.asarray(merged[i] - w0[i]).transpose(0, 2, 1).reshape(4, 8)
    np.testing.assert_allclose(d.scale * b @ a, want, atol=1e-6)
  # Loaded back: kv_einsum as a stack of k_proj and v_proj, the same kernel.
  kv = r"layers/0/attn/kv_einsum/w"
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight' would "
      "adapt 'layers/0/attn/kv_einsum/w', a kernel with batch axes () (shape "
      "(2, 2, 8, 2), layout Layout(batch=(), inputs=(2,), outputs=(0, 1, 3)))"
      ", but module_names named it stacked along its leading 1 axes.")):
    lj.load_peft(tmp_path, params, module_names="tunix-gemma3",
                 layouts=GEMMA_LAYOUTS)
  stacked = {kv: lj.Layout((0,), (2,), (1, 3)), **GEMMA_LAYOUTS}
  _, back, _ = lj.load_peft(tmp_path, params, module_names="tunix-gemma3",
                            layouts=stacked)
  assert lj.adapters(back)[kv].layout == lj.Layout((0,), (2,), (1, 3))
  np.testing.assert_allclose(
      lj.merge(params, back)["layers"]["0"]["attn"]["kv_einsum"]["w"], merged,
      atol=1e-6)
  # A leaf the preset does not name, an unknown preset.
  config = lj.LoraConfig(rank=2, targets=".*input_embedding")
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.raises(lj.PeftFormatError) as e:
    lj.save_peft(tmp_path, delta, config, module_names="tunix-gemma3")
  assert str(e.value).startswith(
      "module_names='tunix-gemma3' names no torch module for 'embedder/"
      "input_embedding': the preset names layers/(\\d+)/attn/q_einsum/w, ")
  assert str(e.value).endswith(
      ". Leave this leaf out of LoraConfig.targets (PEFT's LoRA adapts Linear "
      "modules), or pass module_names=[(regex, replacement), ...] or a "
      "callable that names it.")
  with pytest.raises(ValueError) as e:
    lj.save_peft(tmp_path, delta, config, module_names="tunix-qwen2")
  assert str(e.value) == (
      "module_names='tunix-qwen2' is not a known preset; the presets are "
      "'transformers', 'tunix-qwen3', 'tunix-llama3', 'tunix-gemma3'. "
      "Otherwise pass a callable path -> name or a list of (regex, "
      "replacement) pairs.")


def test_expected_modules_names_the_modules_that_match_none(tmp_path):
  params = _tunix_params()
  config = lj.LoraConfig(rank=2, targets=r"(.*/)?(q_proj|gate_proj|lm_head)/.*",
                         layouts=TUNIX_LAYOUTS)
  delta = _random_delta(params, config)
  torch_names = ["", "model", "model.layers", "model.layers.0",
                 "model.layers.0.self_attn", "model.layers.0.self_attn.q_proj",
                 "model.layers.0.self_attn.k_proj", "model.layers.0.mlp",
                 "model.layers.0.mlp.gate_proj", "lm_head"]
  with pytest.raises(lj.PeftFormatError) as e:
    lj.save_peft(tmp_path, delta, config, expected_modules=torch_names)
  assert str(e.value) == (
      "save_peft: 2 of the 3 module names from module_names match no module "
      "of expected_modules: 'layers.0.attn.q_proj', 'layers.0.mlp.gate_proj' "
      "(closest module to 'layers.0.attn.q_proj': "
      "'model.layers.0.self_attn.q_proj'). PEFT would adapt nothing there. "
      "Name the modules as the torch model does: module_names= a preset "
      "('transformers', 'tunix-qwen3', 'tunix-llama3', 'tunix-gemma3'), "
      "(regex, replacement) pairs or a callable.")
  assert not os.listdir(tmp_path)  # refused before anything is written
  assert lj.save_peft(tmp_path, delta, config, module_names="tunix-qwen3",
                      expected_modules=torch_names) == []
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["target_modules"] == ["gate_proj", "lm_head", "q_proj"]
  assert lj.check_vllm(tmp_path, expected_modules=torch_names) == []
  with pytest.raises(lj.PeftFormatError) as e:
    lj.check_vllm(tmp_path, expected_modules=["lm_head", "model.q_proj"])
  assert str(e.value) == (
      f"{tmp_path}/adapter_model.safetensors: 2 of the 3 module names from "
      "the file match no module of expected_modules: 'model.layers.0.mlp."
      "gate_proj', 'model.layers.0.self_attn.q_proj' (closest module to "
      "'model.layers.0.mlp.gate_proj': 'model.q_proj'). PEFT would adapt "
      "nothing there. Name the modules as the torch model does: module_names="
      " a preset ('transformers', 'tunix-qwen3', 'tunix-llama3', "
      "'tunix-gemma3'), (regex, replacement) pairs or a callable.")


# --------------------------------------------------------------- load errors


def _saved(tmp_path, dora=False):
  params = {"model": {"q_proj": {"kernel": jnp.ones((6, 4))},
                      "k_proj": {"kernel": jnp.ones((6, 4))}}}
  config = lj.LoraConfig(rank=2, targets=".*q_proj/kernel", dora=dora)
  _, delta = lj.split(params, config, jax.random.key(0))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    lj.save_peft(tmp_path, delta, config)
  return params


def _edit(tmp_path, config=None, tensors=None):
  path = tmp_path / "adapter_config.json"
  cfg = json.load(open(path))
  if config:
    cfg.update(config)
    json.dump(cfg, open(path, "w"))
  if tensors is not None:
    old = st.load_file(tmp_path / "adapter_model.safetensors")[0]
    st.save_file(tmp_path / "adapter_model.safetensors", tensors(old))


Q = "base_model.model.model.q_proj"


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "LOHA"}, "field 'peft_type' is 'LOHA'; lora_jax reads LoRA "
     "adapters only (peft_type 'LORA', with or without use_dora / use_rslora)."
     " LoHa, LoKr, IA3, AdaLoRA and prompt methods have no lora_jax "
     "equivalent."),
    ({"layers_to_transform": [0]}, "field 'layers_to_transform' is [0], which "
     "lora_jax does not support (it reads adapters whose layers_to_transform "
     "is unset). Load it in PEFT, merge what it adds, and export a plain LoRA "
     "adapter."),
    ({"modules_to_save": ["lm_head"]}, "field 'modules_to_save' is ['lm_head']"),
    ({"lora_bias": True}, "field 'lora_bias' is True"),
    ({"layer_replication": [[0, 1]]}, "field 'layer_replication' is [[0, 1]]"),
    ({"init_lora_weights": "pissa_niter_4"}, "field 'init_lora_weights' is "
     "'pissa_niter_4': this init rewrites the base weights, so the adapter "
     "only fits PEFT's modified base. Save it from PEFT converted to a plain "
     "LoRA adapter on the original weights: save_pretrained(out_dir, "
     "path_initial_model_for_weight_conversion=<the initial adapter>)."),
    ({"r": 0}, "field 'r' must be a positive number, got 0."),
    ({"lora_alpha": "8"}, "field 'lora_alpha' must be a positive number, got "
     "'8'."),
    ({"bias": "all"}, "field 'bias' is 'all'; lora_jax adapters train no bias "
     "terms (bias 'none'). Merge the adapter in PEFT instead."),
])
def test_load_rejects_unsupported_fields(tmp_path, config, message):
  params = _saved(tmp_path)
  _edit(tmp_path, config)
  with pytest.raises(lj.PeftFormatError) as e:
    lj.load_peft(tmp_path, params)
  assert str(e.value).startswith(f"{tmp_path}/adapter_config.json: {message}")


@pytest.mark.parametrize("edit, message", [
    (lambda t: {**t, "base_model.model.model.embed.lora_embedding_A":
                np.zeros((2, 5), np.float32)},
     "module 'model.embed' has no base_model.model.model.embed."
     "lora_embedding_B."),
    (lambda t: {**t, Q + ".lora_B.bias": np.zeros(6, np.float32)},
     f"key '{Q}.lora_B.bias' is a LoRA bias (lora_bias)."),
    (lambda t: {**t, "model.q_proj.lora_A.weight": np.zeros((2, 4), np.float32)},
     "key 'model.q_proj.lora_A.weight' is not a base_model.model.<module>."
     "lora_A.weight / lora_B.weight / lora_magnitude_vector / "
     "lora_embedding_A / lora_embedding_B tensor."),
    (lambda t: {k: v for k, v in t.items() if "lora_B" not in k},
     f"module 'model.q_proj' has no {Q}.lora_B.weight."),
    (lambda t: {**t, Q + ".lora_magnitude_vector": np.ones(6, np.float32)},
     f"module 'model.q_proj' has {Q}.lora_magnitude_vector but the field "
     f"'use_dora' is false."),
    (lambda t: {}, "no LoRA tensors."),
    (lambda t: {k.replace("q_proj", "q_prj"): v for k, v in t.items()},
     "module 'model.q_prj' matches no leaf of params (module names come from "
     "leaf paths by module_names). Closest: 'model.q_proj' (model/q_proj/"
     "kernel), 'model.k_proj' (model/k_proj/kernel). Pass module_names="
     "[(regex, replacement), ...] or a callable path -> name that gives this "
     "module's kernel the name 'model.q_prj'."),
    (lambda t: {k: (v[:1] if "lora_A" in k else v) for k, v in t.items()},
     f"'{Q}.lora_A.weight' has shape (1, 6), but adapter_config.json gives "
     "'model.q_proj' rank 2 (field r); want (2, in)."),
    (lambda t: {k: (np.zeros((6, 2), np.float32) if "lora_B" in k else
                    np.zeros((2, 6), np.float32)) for k, v in t.items()},
     f"'{Q}.lora_A.weight' (2, 6) and '{Q}.lora_B.weight' (6, 2) do not fit "
     "'model/q_proj/kernel' (shape (6, 4), layout Layout(batch=(), inputs=(0,)"
     ", outputs=(1,)): in 6, out 4; want (2, 6) and (4, 2)). If the kernel is "
     "stored (out, in), pass apply_fn and example_args so its layout is "
     "traced, or layouts={'model/q_proj/kernel': lora_jax.Layout.transposed()}"
     "."),
])
def test_load_rejects_bad_tensors(tmp_path, edit, message):
  params = _saved(tmp_path)
  _edit(tmp_path, tensors=edit)
  with pytest.raises(lj.PeftFormatError) as e:
    lj.load_peft(tmp_path, params)
  assert str(e.value) == f"{tmp_path}/adapter_model.safetensors: {message}"


def test_load_errors_dora_and_names(tmp_path):
  params = _saved(tmp_path, dora=True)
  _edit(tmp_path, tensors=lambda t: {k: v for k, v in t.items()
                                     if "magnitude" not in k})
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      f"module 'model.q_proj' has no {Q}.lora_magnitude_vector.")):
    lj.load_peft(tmp_path, params)
  _edit(tmp_path, tensors=lambda t: {
      **t, Q + ".lora_magnitude_vector": np.ones(3, np.float32)})
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      f"'{Q}.lora_magnitude_vector' has shape (3,); want (4,), one magnitude "
      f"per output of 'model/q_proj/kernel'.")):
    lj.load_peft(tmp_path, params)
  _edit(tmp_path, tensors=lambda t: {
      **t, Q + ".lora_magnitude_vector": np.ones(4, np.float32)})
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "module 'model.q_proj' is the name of several leaves ['model/k_proj/"
      "kernel', 'model/q_proj/kernel']; pass module_names so that only its "
      "kernel gets this name.")):
    lj.load_peft(tmp_path, params, module_names=lambda p: "model.q_proj")


def test_load_errors_files(tmp_path):
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      f"{tmp_path}: no adapter_config.json; a PEFT adapter directory holds "
      f"adapter_config.json and adapter_model.safetensors.")):
    lj.load_peft(tmp_path, {})
  (tmp_path / "adapter_config.json").write_text("[1")
  with pytest.raises(lj.PeftFormatError, match="adapter_config.json: not "
                     "readable JSON"):
    lj.load_peft(tmp_path, {})
  (tmp_path / "adapter_config.json").write_text("[1]")
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      "adapter_config.json: expected a JSON object, got [1].")):
    lj.load_peft(tmp_path, {})
  (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2'
                                                ', "lora_alpha": 4}')
  with pytest.raises(lj.PeftFormatError) as e:
    lj.load_peft(tmp_path, {})
  assert str(e.value) == f"{tmp_path}: no adapter_model.safetensors."
  (tmp_path / "adapter_model.bin").write_bytes(b"")
  with pytest.raises(lj.PeftFormatError, match=re.escape(
      f"{tmp_path}: no adapter_model.safetensors. It has adapter_model.bin "
      f"(pickled torch tensors), which lora_jax does not unpickle: convert it "
      f"with PEFT, PeftModel.from_pretrained(model, dir).save_pretrained("
      f"out_dir, safe_serialization=True).")):
    lj.load_peft(tmp_path, {})


def test_nested_json_and_huge_shapes_are_peft_format_errors(tmp_path):
  params = _saved(tmp_path)
  config = tmp_path / "adapter_config.json"
  weights = tmp_path / "adapter_model.safetensors"
  good_config, good_weights = config.read_text(), weights.read_bytes()
  head = '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "x": '
  for depth, message in (
      (100_000, "its JSON is nested too deeply to read; an adapter config is "
       "a flat object of fields."),
      (100, "field 'x' is nested more than 64 levels deep; an adapter config "
       "is a flat object of fields.")):
    config.write_text(head + "[" * depth + "]" * depth + "}")
    for call in (lambda: lj.load_peft(tmp_path, params),
                 lambda: lj.check_vllm(tmp_path)):
      with pytest.raises(lj.PeftFormatError) as e:
        call()
      assert str(e.value) == (
          f"{config}: {message} Write it again (PEFT's save_pretrained, or "
          f"lora_jax.save_peft).")
  config.write_text(good_config)
  for header, message in (
      (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
       "the header's JSON is nested too deeply to read"),
      (b'{"x":{"dtype":"F32","shape":[0,4611686018427387904],'
       b'"data_offsets":[0,0]}}',
       "tensor 'x' has shape [0, 4611686018427387904], larger than any array "
       f"({np.iinfo(np.intp).max} bytes)")):
    weights.write_bytes(safetensors_bytes(header, b""))
    for call in (lambda: lj.load_peft(tmp_path, params),
                 lambda: lj.check_vllm(tmp_path)):
      with pytest.raises(lj.PeftFormatError) as e:
        call()
      assert str(e.value) == (
          f"{weights} is not a valid safetensors file: {message}. Write it "
          f"again (PEFT's save_pretrained, or lora_jax.save_peft).")
  weights.write_bytes(good_weights)
  assert lj.check_vllm(tmp_path) == []


# ------------------------------------------------------------------ serving


def test_check_vllm_on_configs():
  assert lj.check_vllm(lj.LoraConfig(rank=8, rslora=True)) == []
  dora, = lj.check_vllm(lj.LoraConfig(dora=True))
  assert dora == ("use_dora: vLLM does not serve DoRA adapters. Merge the "
                  "adapter into the base (lora_jax.merge) and serve the merged "
                  "weights, or train plain LoRA (LoraConfig(dora=False)).")
  pattern, = lj.check_vllm(lj.LoraConfig(alpha_pattern={"q": 2.0}))
  assert pattern == (
      "rank_pattern/alpha_pattern: vLLM scales every module by lora_alpha/r "
      "and ignores both patterns, so modules with their own scale would be "
      "served wrong: save it with lora_jax.save_peft(..., fold_scales=True), "
      "which folds each module's scale into its lora_B.")
  pissa, = lj.check_vllm(lj.LoraConfig(init="pissa"))
  assert pissa == (
      "init='pissa': the adapter belongs with the residual base that "
      "lora_jax.split returned, but a server applies it to the original "
      "weights. Convert it first: lora_jax.to_plain_lora(initial_delta, delta) "
      "(rank 2r, exact on the original weights).")


def test_check_vllm_on_directories(tmp_path):
  params = _saved(tmp_path)
  assert lj.check_vllm(tmp_path) == []
  _edit(tmp_path, {"use_dora": True, "modules_to_save": ["lm_head"],
                   "bias": "all", "alpha_pattern": {"q_proj": 4}})
  problems = lj.check_vllm(tmp_path)
  assert problems == [
      "use_dora: vLLM does not serve DoRA adapters. Merge the adapter into "
      "the base (lora_jax.merge) and serve the merged weights, or train plain "
      "LoRA (LoraConfig(dora=False)).",
      "modules_to_save=['lm_head']: vLLM serves modules_to_save=None only. "
      "Merge the adapter and the saved modules into the base and serve the "
      "merged model.",
      "bias='all': vLLM serves LoRA adapters without bias terms "
      "(bias='none'). Merge the adapter into the base instead.",
      "rank_pattern/alpha_pattern: vLLM scales every module by lora_alpha/r "
      "and ignores both patterns, so modules with their own scale (1 of them, "
      "e.g. 'model.q_proj') would be served wrong: save it with lora_jax.save_peft"
      "(..., fold_scales=True), which folds each module's scale into its "
      "lora_B."]
  del params


def test_save_peft_warns_for_dora(tmp_path):
  params = {"m": {"q": {"kernel": jnp.ones((4, 4))}}}
  config = lj.LoraConfig(rank=2, dora=True)
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.warns(UserWarning) as record:
    problems = lj.save_peft(tmp_path, delta, config)
  assert str(record[0].message) == (
      "save_peft: a vLLM server would not serve this adapter as written:\n- "
      + problems[0])
  assert problems[0].startswith("use_dora: vLLM does not serve DoRA")


def test_save_peft_warns_for_principal_init(tmp_path):
  params = {"m": {"q": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}}
  config = lj.LoraConfig(rank=2, init="pissa")
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.warns(UserWarning, match=re.escape(
      "init='pissa': the adapter belongs with the residual base")):
    lj.save_peft(tmp_path, delta, config)


# ------------------------------- embeddings, tied heads, experts (no torch)


def _moe_params(seed=0):
  """A table used for lookups and as the tied output head, a dense kernel,
  and GPT-OSS-like stacked experts (3, 8, 12) and (3, 6, 8)."""
  rng = np.random.default_rng(seed)
  w = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
  return {"model": {"embed_tokens": {"embedding": w(16, 8)},
                    "layers": {"0": {"q_proj": {"kernel": w(8, 8)},
                                     "mlp": {"experts": {
                                         "gate_up_proj": w(3, 8, 12),
                                         "down_proj": w(3, 6, 8)}}}}}}


def _moe_fn(p, ids):
  m = p["model"]
  table, layer = m["embed_tokens"]["embedding"], m["layers"]["0"]
  x = table[ids] @ layer["q_proj"]["kernel"]
  experts = layer["mlp"]["experts"]
  h = jnp.einsum("ebd,edf->ebf", jnp.broadcast_to(x, (3, *x.shape)),
                 experts["gate_up_proj"])
  h = jax.nn.silu(h[..., :6]) * h[..., 6:]
  y = jnp.einsum("ebf,efd->ebd", h, experts["down_proj"]).sum(0)
  return (x + y) @ table.T  # the tied head


MOE_IDS = jnp.array([1, 5, 7, 3])
MOE_NAMES = [(r"model/layers/(\d+)/mlp/experts/(gate_up_proj|down_proj)",
              r"model.layers.\1.mlp.experts.\2")]
MOE_LAYOUTS = {r".*/experts/.*": lj.Layout((0,), (1,), (2,))}


@pytest.fixture(scope="module")
def moe_saved(tmp_path_factory):
  """(params, delta, directory): every adapter kind, saved by save_peft."""
  params = _moe_params()
  config = lj.LoraConfig(rank=2, alpha=6.0, targets=(
      r".*/(embedding|q_proj/kernel|gate_up_proj|down_proj)"))
  _, delta = lj.split(params, config, jax.random.key(0), _moe_fn, (MOE_IDS,))
  delta = _np_filled(delta)
  directory = tmp_path_factory.mktemp("moe")
  assert lj.save_peft(directory, delta, config, module_names=MOE_NAMES,
                      tied_heads={".*/embed_tokens/embedding": "lm_head"},
                      parameter_order=["gate_up_proj", "down_proj"]) == []
  return params, delta, directory


def test_embedding_head_and_expert_tensors_are_peft_s(moe_saved):
  """The file's keys and shapes are PEFT's, and PEFT's arithmetic on them
  (written out in numpy) is lj.merge's: Embedding (B @ A)^T, the tied head's
  Linear B @ A, ParamWrapper's per-expert B3[:, :, e] @ A3[e]."""
  params, delta, directory = moe_saved
  t, _ = st.load_file(directory / "adapter_model.safetensors")
  cfg = json.loads((directory / "adapter_config.json").read_text())
  p, e = "base_model.model.model.", "layers.0.mlp.experts."
  assert {k: v.shape for k, v in t.items()} == {
      p + "embed_tokens.lora_embedding_A": (2, 16),
      p + "embed_tokens.lora_embedding_B": (8, 2),
      "base_model.model.lm_head.lora_A.weight": (2, 8),
      "base_model.model.lm_head.lora_B.weight": (16, 2),
      p + "layers.0.q_proj.lora_A.weight": (2, 8),
      p + "layers.0.q_proj.lora_B.weight": (8, 2),
      # gate_up_proj registered first: the inner wrapper.
      p + e + "base_layer.lora_A.weight": (6, 12),
      p + e + "base_layer.lora_B.weight": (8, 6),
      p + e + "lora_A.weight": (6, 8), p + e + "lora_B.weight": (6, 6)}
  assert cfg["target_parameters"] == ["model." + e + "down_proj",
                                      "model." + e + "gate_up_proj"]
  assert cfg["ensure_weight_tying"] is True and cfg["lora_dropout"] == 0.0
  assert cfg["target_modules"] == ["lm_head", "model.embed_tokens",
                                   "model.layers.0.q_proj"]
  # The torch modules of those keys, nested wrappers included.
  torch_modules = ["lm_head", "model.embed_tokens", "model.layers.0.q_proj",
                   "model.layers.0.mlp.experts"]
  assert lj.check_vllm(directory, expected_modules=torch_modules) == []
  s = 3.0
  merged = lj.merge(params, delta)
  diff = lambda *ks: np.asarray(
      _get(merged, ks)) - np.asarray(_get(params, ks))
  emb = s * (t[p + "embed_tokens.lora_embedding_B"]
             @ t[p + "embed_tokens.lora_embedding_A"]).T
  np.testing.assert_allclose(diff("model", "embed_tokens", "embedding"), emb,
                             atol=1e-6)
  # The head's LoRA is the embedding's transposed: the same delta.
  np.testing.assert_array_equal(t["base_model.model.lm_head.lora_A.weight"],
                                t[p + "embed_tokens.lora_embedding_B"].T)
  np.testing.assert_array_equal(t["base_model.model.lm_head.lora_B.weight"],
                                t[p + "embed_tokens.lora_embedding_A"].T)
  for inner, name in (("base_layer.", "gate_up_proj"), ("", "down_proj")):
    lora_a, lora_b = t[p + e + inner + "lora_A.weight"], t[
        p + e + inner + "lora_B.weight"]
    want = s * np.einsum("ore,eri->eoi", lora_b.reshape(-1, 2, 3),
                         lora_a.reshape(3, 2, -1))
    np.testing.assert_allclose(
        diff("model", "layers", "0", "mlp", "experts", name), want,
        atol=1e-6)


def _np_filled(delta, seed=3):
  """Random factors drawn by numpy (no compilation per shape)."""
  rng = np.random.default_rng(seed)
  draw = lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype)
  return lj.map_with_paths(
      lambda p, d: d.replace(a=draw(d.a), b=draw(d.b)) if isinstance(
          d, lj.LoraDelta) else d, delta,
      is_leaf=lambda x: x is None or isinstance(x, lj.LoraDelta))


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def test_embedding_head_and_experts_round_trip(moe_saved, tmp_path):
  """load_peft gives back the factors bitwise (the head's copy dropped: the
  table's adapter is the head's) and lj.wrap computes lj.merge's output;
  without parameter_order the one order whose shapes fit is taken."""
  params, delta, directory = moe_saved
  base, loaded, config = lj.load_peft(directory, params,
                                      module_names=MOE_NAMES,
                                      layouts=MOE_LAYOUTS)
  assert sorted(lj.adapters(loaded)) == sorted(lj.adapters(delta))
  for path, d in lj.adapters(delta).items():
    got = lj.adapters(loaded)[path]
    assert got.scale == d.scale and got.layout == d.layout, path
    np.testing.assert_array_equal(got.a, d.a)
    np.testing.assert_array_equal(got.b, d.b)
  want = _moe_fn(lj.merge(params, delta), MOE_IDS)
  base, loaded, _ = lj.load_peft(directory, params, module_names=MOE_NAMES,
                                 apply_fn=_moe_fn, example_args=(MOE_IDS,),
                                 parameter_order=["gate_up_proj", "down_proj"])
  np.testing.assert_allclose(jax.jit(lj.wrap(_moe_fn))(base, loaded, MOE_IDS), want,
                             atol=1e-5)
  assert np.abs(want - _moe_fn(params, MOE_IDS)).max() > 1e-2


def test_embedding_and_expert_errors(moe_saved, tmp_path):
  params, delta, directory = moe_saved
  cfg = lj.LoraConfig(rank=2, alpha=6.0)
  with pytest.raises(lj.PeftFormatError, match=r"'model.layers.0.mlp."
                     r"experts' holds 2 adapted parameters .*Pass "
                     r"parameter_order=.*missing: \['down_proj'\]"):
    lj.save_peft(tmp_path / "x", delta, cfg, module_names=MOE_NAMES,
                 parameter_order=["gate_up_proj"])
  with pytest.raises(lj.PeftFormatError, match="tied_heads names output "
                     r"heads \['lm_head'\] for 'model/layers/0/q_proj/kernel'"):
    lj.save_peft(tmp_path / "x", delta, cfg, module_names=MOE_NAMES,
                 tied_heads={".*q_proj/kernel": "lm_head"},
                 parameter_order=["gate_up_proj", "down_proj"])
  # DoRA on a table: PEFT's Embedding normalises rows, lora_jax columns.
  dcfg = lj.LoraConfig(rank=2, dora=True, targets=".*/embedding")
  _, ddelta = lj.split(params, dcfg, jax.random.key(0))
  with pytest.raises(lj.PeftFormatError, match="is a DoRA adapter on an "
                     "embedding table; PEFT's DoRA Embedding normalises per "
                     "vocabulary row"):
    lj.save_peft(tmp_path / "x", ddelta, dcfg)
  (tmp_path / "dora").mkdir()
  (tmp_path / "dora" / "adapter_config.json").write_text(
      (directory / "adapter_config.json").read_text().replace(
          '"use_dora": false', '"use_dora": true'))
  st.save_file(tmp_path / "dora" / "adapter_model.safetensors",
               *st.load_file(directory / "adapter_model.safetensors"))
  with pytest.raises(lj.PeftFormatError, match="module 'model.embed_tokens' "
                     "is a DoRA Embedding"):
    lj.load_peft(tmp_path / "dora", params, module_names=MOE_NAMES,
                 layouts=MOE_LAYOUTS)
  # Without the head's copy (and no embed_tokens tying), PEFT's head would
  # miss the adapter: an error with apply_fn showing the tie, or without it.
  t, meta = st.load_file(directory / "adapter_model.safetensors")
  edited = tmp_path / "nohead"
  edited.mkdir()
  (edited / "adapter_config.json").write_text(
      (directory / "adapter_config.json").read_text().replace(
          '"ensure_weight_tying": true', '"ensure_weight_tying": false'))
  st.save_file(edited / "adapter_model.safetensors", {
      k: v for k, v in t.items() if "lm_head" not in k}, meta)
  with pytest.raises(lj.PeftFormatError, match="PEFT applies to the lookup "
                     "only.*apply_fn also uses 'model/embed_tokens/embedding' "
                     "as a tied output head"):
    lj.load_peft(edited, params, module_names=MOE_NAMES, apply_fn=_moe_fn,
                 example_args=(MOE_IDS,))
  with pytest.raises(lj.PeftFormatError, match="Pass apply_fn and "
                     "example_args so that load_peft can tell"):
    lj.load_peft(edited, params, module_names=MOE_NAMES, layouts=MOE_LAYOUTS)
  # PEFT's saved base weights of the table: accepted when they are params'.
  table = np.asarray(params["model"]["embed_tokens"]["embedding"])
  for base_weight, ok in ((table, True), (table + 1e-3, False)):
    st.save_file(edited / "adapter_model.safetensors", {**t, (
        "base_model.model.model.embed_tokens.base_layer.weight"): base_weight},
                 meta)
    (edited / "adapter_config.json").write_text(
        (directory / "adapter_config.json").read_text())
    if ok:
      lj.load_peft(edited, params, module_names=MOE_NAMES, layouts=MOE_LAYOUTS)
      continue
    with pytest.raises(lj.PeftFormatError, match="holds base weights of "
                       "'model.embed_tokens' that differ from params'"):
      lj.load_peft(edited, params, module_names=MOE_NAMES, layouts=MOE_LAYOUTS)
  # Two expert stacks of one shape: the nesting needs parameter_order.
  same = {"m": {"experts": {"up": params["model"]["layers"]["0"]["mlp"][
      "experts"]["gate_up_proj"][:, :, :8], "down": params["model"][
          "layers"]["0"]["mlp"]["experts"]["gate_up_proj"][:, :, 4:]}}}
  names = [(r"m/experts/(\w+)", r"m.experts.\1")]
  _, d2 = lj.split(same, lj.LoraConfig(rank=2, alpha=6.0, targets=".*",
                                       layouts=MOE_LAYOUTS), jax.random.key(1))
  d2 = _np_filled(d2)
  lj.save_peft(tmp_path / "same", d2, cfg, module_names=names,
               parameter_order=["up", "down"])
  with pytest.raises(lj.PeftFormatError, match=r"cannot tell which of "
                     r"'m.experts''s targeted parameters \['down', 'up'\] .*2 "
                     r"orders fit.*Pass parameter_order"):
    lj.load_peft(tmp_path / "same", same, module_names=names,
                 layouts=MOE_LAYOUTS)
  _, got, _ = lj.load_peft(tmp_path / "same", same, module_names=names,
                           layouts=MOE_LAYOUTS, parameter_order=["up", "down"])
  for path, d in lj.adapters(d2).items():
    np.testing.assert_array_equal(lj.adapters(got)[path].a, d.a)


@pytest.mark.parametrize("with_lora", [True, False])
def test_trainable_tokens_files_and_round_trip(tmp_path, with_lora):
  """Trainable tokens are written as PEFT writes them (their rows' new
  values; in a LoRA adapter under token_adapter with trainable_token_indices,
  alone as a TRAINABLE_TOKENS adapter with token_indices) and read back
  bitwise."""
  params = _moe_params()["model"]
  params = {"model": {"embed_tokens": params["embed_tokens"],
                      "q_proj": params["layers"]["0"]["q_proj"],
                      "lm_head": {"kernel": jnp.ones((8, 16))}}}
  config = lj.LoraConfig(rank=2, alpha=4.0, targets=r".*q_proj/kernel",
                         exclude=None if with_lora else ".*",
                         trainable_tokens={".*/embedding": [5, 2]})
  _, delta = lj.split(params, config, jax.random.key(0))
  tokens = delta["model"]["embed_tokens"]["embedding"]
  delta["model"]["embed_tokens"]["embedding"] = tokens.replace(
      values=tokens.values * 2 + 1)
  delta = _np_filled(delta)
  lj.save_peft(tmp_path, delta, config)
  t, _ = st.load_file(tmp_path / "adapter_model.safetensors")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  key = "base_model.model.model.embed_tokens." + (
      "token_adapter." if with_lora else "") + "trainable_tokens_delta"
  np.testing.assert_array_equal(
      t[key], np.asarray(params["model"]["embed_tokens"]["embedding"])[
          [5, 2]] * 2 + 1)
  assert len(t) == (3 if with_lora else 1)
  if with_lora:
    assert cfg["peft_type"] == "LORA"
    assert cfg["trainable_token_indices"] == {"model.embed_tokens": [5, 2]}
  else:
    assert {k: cfg[k] for k in ("peft_type", "target_modules",
                                "token_indices")} == {
        "peft_type": "TRAINABLE_TOKENS",
        "target_modules": ["model.embed_tokens"], "token_indices": [5, 2]}
  base, loaded, got = lj.load_peft(tmp_path, params)
  assert got.trainable_tokens == config.trainable_tokens.__class__(
      ((re.escape("model/embed_tokens/embedding"), (5, 2)),))
  got_tokens = loaded["model"]["embed_tokens"]["embedding"]
  assert got_tokens.indices == (5, 2)
  np.testing.assert_array_equal(
      got_tokens.values, delta["model"]["embed_tokens"]["embedding"].values)
  assert sorted(lj.adapters(loaded)) == (
      ["model/q_proj/kernel"] if with_lora else [])
  np.testing.assert_array_equal(
      lj.merge(base, loaded)["model"]["embed_tokens"]["embedding"],
      lj.merge(params, delta)["model"]["embed_tokens"]["embedding"])


def test_trainable_tokens_errors(tmp_path):
  params = {"model": {"embed_tokens": {"embedding": jnp.ones((16, 8))},
                      "wpe": {"embedding": jnp.ones((16, 8))}}}
  config = lj.LoraConfig(targets=".*", exclude=".*", trainable_tokens={
      ".*embed_tokens.*": [1], ".*wpe.*": [2]})
  _, delta = lj.split(params, config, jax.random.key(0))
  with pytest.raises(lj.PeftFormatError, match="have different trainable "
                     "token ids; PEFT's TrainableTokensConfig has one"):
    lj.save_peft(tmp_path / "x", delta, config)
  config = lj.LoraConfig(targets=".*", exclude=".*", trainable_tokens={
      ".*embed_tokens.*": [1, 4]})
  _, delta = lj.split(params, config, jax.random.key(0))
  lj.save_peft(tmp_path, delta, config)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  for field, value, message in (
      ("token_indices", None, r"the field 'token_indices' \(None\) gives no "
       "list of token ids for 'model.embed_tokens'"),
      ("token_indices", [1, 4, 5], r"has shape \(2, 8\); want \(3, dim\), one "
       "row per token id")):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**cfg, field: value}))
    with pytest.raises(lj.PeftFormatError, match=message):
      lj.load_peft(tmp_path, params)


# ------------------------------------------------- against PyTorch PEFT


INTEROP_REASON = "interop tests run on the py311 CI leg (LORA_JAX_INTEROP=1)"


@pytest.fixture(scope="module")
def hf():
  """torch, peft, transformers and safetensors, or a skip (a failure with
  LORA_JAX_INTEROP=1, where CI promises to run these tests)."""
  try:
    import peft
    import safetensors.numpy
    import torch
    import transformers
  except ImportError as e:
    if os.environ.get("LORA_JAX_INTEROP") == "1":
      pytest.fail(f"LORA_JAX_INTEROP=1 but {e}: install lora_jax[interop].")
    pytest.skip(INTEROP_REASON)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  transformers.logging.set_verbosity_error()
  return torch, peft, transformers, safetensors


IDS = np.array([[1, 5, 7, 9, 3, 2, 11, 4], [8, 2, 6, 0, 13, 1, 5, 9]])

# Per model: the torch modules PEFT adapts (target_modules) and the Flax
# kernels lora_jax adapts (targets): the same set. GPT-2's mlp.c_proj is
# adapted and attn.c_proj is not, so suffixes must be told apart.
MODELS = {
    "llama": (["q_proj", "v_proj", "down_proj"],
              r".*/(q_proj|v_proj|down_proj)/kernel",
              {"rank_pattern": {"q_proj": 2},
               "alpha_pattern": {"layers.1.self_attn.v_proj": 3.0}},
              {"rank_pattern": {r".*/q_proj/kernel": 2},
               "alpha_pattern": {r".*/1/self_attn/v_proj/kernel": 3.0}}),
    "gpt2": (["c_attn", "mlp.c_proj", "c_fc"],
             r".*/(c_attn|mlp/c_proj|c_fc)/kernel",
             {"rank_pattern": {"c_attn": 2}, "alpha_pattern": {
                 "h.1.mlp.c_proj": 3.0}},
             {"rank_pattern": {r".*/c_attn/kernel": 2},
              "alpha_pattern": {r".*/1/mlp/c_proj/kernel": 3.0}}),
}
VARIANTS = ("lora", "rslora", "dora", "pattern")


@pytest.fixture(scope="module")
def models(hf, tmp_path_factory):
  """{name: (torch model, flax model)}: tiny models, the same weights."""
  torch, _, transformers, _ = hf
  torch.manual_seed(0)
  out = {}
  for name in MODELS:
    if name == "llama":
      cfg = transformers.LlamaConfig(
          vocab_size=16, hidden_size=32, intermediate_size=48,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=32)
      pt, fx = transformers.LlamaForCausalLM, transformers.FlaxLlamaForCausalLM
    else:
      cfg = transformers.GPT2Config(vocab_size=16, n_embd=32, n_layer=2,
                                    n_head=4, n_positions=32)
      pt, fx = transformers.GPT2LMHeadModel, transformers.FlaxGPT2LMHeadModel
    model = pt(cfg).eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    out[name] = (model, fx.from_pretrained(path, from_pt=True))
  return out


def _flax_fn(flax_model):
  return lambda p, ids: flax_model(ids, params=p).logits


def _peft_kwargs(model, variant):
  kw = {"lora": {}, "rslora": {"use_rslora": True},
        "dora": {"use_dora": True}, "pattern": MODELS[model][2]}[variant]
  return dict(r=4, lora_alpha=8, target_modules=MODELS[model][0], **kw)


def _lj_config(model, variant):
  kw = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True},
        "pattern": MODELS[model][3]}[variant]
  return lj.LoraConfig(rank=4, alpha=8.0, targets=MODELS[model][1], **kw)


def _torch_logits(hf, model):
  torch = hf[0]
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_peft_adapter_in_lora_jax(hf, models, model, variant, tmp_path):
  """An adapter made by PEFT (random non-zero A, B, magnitudes) gives PEFT's
  logits in lora_jax."""
  torch, peft, _, _ = hf
  torch_model, flax_model = models[model]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # GPT-2: fan_in_fan_out set for Conv1D
    pm = peft.get_peft_model(copy.deepcopy(torch_model),
                             peft.LoraConfig(**_peft_kwargs(model, variant)))
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_A" in n or "lora_B" in n:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
      if "lora_magnitude_vector" in n:
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
  pm.eval()
  want = _torch_logits(hf, pm)
  assert np.abs(want - _torch_logits(hf, torch_model)).max() > 1e-2
  pm.save_pretrained(tmp_path)
  f = _flax_fn(flax_model)
  base, delta, config = lj.load_peft(tmp_path, flax_model.params, apply_fn=f,
                                     example_args=(IDS,))
  assert len(lj.adapters(delta)) == 6
  assert config.dora == (variant == "dora") and config.rslora == (
      variant == "rslora")
  got = np.asarray(jax.jit(lj.wrap(f))(base, delta, IDS))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_lora_jax_adapter_in_peft(hf, models, model, variant, tmp_path):
  """An adapter made by lora_jax, saved with save_peft, gives lora_jax's
  logits in PEFT (PeftModel.from_pretrained)."""
  _, peft, _, _ = hf
  torch_model, flax_model = models[model]
  f = _flax_fn(flax_model)
  config = _lj_config(model, variant)
  params = flax_model.params
  base, delta = lj.split(params, config, jax.random.key(0), apply_fn=f,
                         example_args=(IDS,))
  delta = _randomized(delta)
  want = np.asarray(jax.jit(lj.wrap(f))(base, delta, IDS))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # DoRA / patterns: vLLM warnings
    lj.save_peft(tmp_path, delta, config)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path)
  pm.eval()
  got = _torch_logits(hf, pm)
  assert np.abs(got - _torch_logits(hf, torch_model)).max() > 1e-2
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# The tunix-shaped decoders of tests/tunix_models.py: (torch model class,
# config class, config fields, the leaves lora_jax adapts). Gemma3: one RoPE
# base for its local and global layers, a window longer than the input.
TINY = dict(vocab_size=16, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=32, rms_norm_eps=1e-6)
_TUNIX_LINEAR = (r"layers/\d+/attn/(q|k|v|o)_proj/w|layers/\d+/mlp/"
                 r"(gate|up|down)_proj/kernel")
TUNIX = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              {"tie_word_embeddings": False}, _TUNIX_LINEAR + "|lm_head/w"),
    "llama3": ("LlamaForCausalLM", "LlamaConfig", {},
               _TUNIX_LINEAR + "|lm_head/w"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               {"query_pre_attn_scalar": 8, "rope_theta": 1e4,
                "rope_local_base_freq": 1e4, "sliding_window": 16},
               r"layers/\d+/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w|"
               r"layers/\d+/mlp/(gate|up|down)_proj/kernel"),
}


@pytest.mark.parametrize("preset", ["tunix-qwen3", "tunix-llama3",
                                    "tunix-gemma3", "transformers"])
def test_preset_adapter_in_peft(hf, models, preset, tmp_path):
  """save_peft(module_names=preset) on the JAX model of a family, the
  transformers torch model's weights converted to it: PEFT's logits are
  lj.merge's."""
  torch, peft, transformers, _ = hf
  if preset == "transformers":
    torch_model, flax_model = models["llama"]
    params, f = flax_model.params, _flax_fn(flax_model)
    targets = MODELS["llama"][1]
  else:
    family = preset[len("tunix-"):]
    model_cls, config_cls, fields, targets = TUNIX[family]
    torch.manual_seed(0)
    torch_model = getattr(transformers, model_cls)(
        getattr(transformers, config_cls)(**TINY, **fields)).eval()
    params, f = tunix_models.from_torch(family, torch_model)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(params, IDS)),
                               _torch_logits(hf, torch_model), atol=1e-5)
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=targets)
  _, delta = lj.split(params, config, jax.random.key(0), f, (IDS,))
  delta = _fill(delta)
  want = np.asarray(jax.jit(f)(lj.merge(params, delta), IDS))
  names = [n for n, _ in torch_model.named_modules()]
  assert lj.save_peft(tmp_path, delta, config, module_names=preset,
                      expected_modules=names) == []
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path)
  pm.eval()
  got = _torch_logits(hf, pm)
  assert np.abs(got - _torch_logits(hf, torch_model)).max() > 1e-1
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  # Every module of the file holds its adapter in PEFT (gemma3: kv_einsum
  # is k_proj and v_proj).
  adapted = sorted(n[:-len(".lora_A.default")] for n, _ in pm.named_modules()
                   if n.endswith(".lora_A.default"))
  # 2 layers of q, k, v, o, gate, up, down (+ lm_head); Flax Llama: q, v, down
  want_count = {"transformers": 6, "tunix-gemma3": 14}.get(preset, 15)
  assert len(adapted) == want_count, adapted


def _randomized(delta):
  key = jax.random.key(5)

  def fill(path, d):
    if not isinstance(d, lj.LoraDelta):
      return d
    ka, kb, km = jax.random.split(jax.random.fold_in(key, len(path)), 3)
    out = d.replace(a=jax.random.normal(ka, d.a.shape) * 0.3,
                    b=jax.random.normal(kb, d.b.shape) * 0.3)
    if d.magnitude is not None:
      out = out.replace(magnitude=d.magnitude * (
          1 + 0.2 * jax.random.normal(km, d.magnitude.shape)))
    return out
  return lj.map_with_paths(fill, delta, is_leaf=lambda x: x is None or (
      isinstance(x, lj.LoraDelta)))


# ------------------------- embeddings, tied heads and experts against PEFT


def _random_lora(hf, pm, seed=1):
  """PEFT's LoRA factors of ``pm`` filled with random values (PEFT zeros
  lora_B, or lora_embedding_A, at init)."""
  torch = hf[0]
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
  return pm.eval()


def test_embedding_adapter_with_tied_head_both_ways(hf, models, tmp_path):
  """GPT-2 ties lm_head to wte. lora_jax's adapter of wte reaches the tied
  head; in PEFT the head's own LoRA (lm_head, a copy of the embedding's
  factors transposed, as ensure_weight_tying makes it) does. PEFT's file
  gives PEFT's logits in lora_jax, save_peft's gives lora_jax's in PEFT."""
  _, peft, _, _ = hf
  torch_model, flax_model = models["gpt2"]
  f = _flax_fn(flax_model)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fan_in_fan_out for Conv1D
    pm = _random_lora(hf, peft.get_peft_model(
        copy.deepcopy(torch_model), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["wte", "c_attn", "lm_head"])))
  # PEFT ties only embed_tokens' head itself: tie GPT-2's by hand.
  emb = pm.base_model.model.transformer.wte
  head = pm.base_model.model.lm_head
  with hf[0].no_grad():
    head.lora_A["default"].weight.copy_(emb.lora_embedding_B["default"].T)
    head.lora_B["default"].weight.copy_(emb.lora_embedding_A["default"].T)
  want = _torch_logits(hf, pm)
  assert np.abs(want - _torch_logits(hf, torch_model)).max() > 1e-2
  pm.save_pretrained(tmp_path / "peft")
  base, delta, _ = lj.load_peft(tmp_path / "peft", flax_model.params,
                                apply_fn=f, example_args=(IDS,))
  assert sorted(lj.adapters(delta)) == [
      "transformer/h/0/attn/c_attn/kernel", "transformer/h/1/attn/c_attn/kernel",
      "transformer/wte/embedding"]
  got = np.asarray(jax.jit(lj.wrap(f))(base, delta, IDS))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  config = lj.LoraConfig(rank=2, alpha=4.0,
                         targets=r".*/(wte/embedding|c_attn/kernel)")
  base, delta = lj.split(flax_model.params, config, jax.random.key(0), f,
                         (IDS,))
  delta = _randomized(delta)
  want = np.asarray(jax.jit(lj.wrap(f))(base, delta, IDS))
  lj.save_peft(tmp_path / "lj", delta, config,
               tied_heads={"transformer/wte/embedding": "lm_head"})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model),
                                        tmp_path / "lj").eval()
  got = _torch_logits(hf, pm)
  assert np.abs(got - _torch_logits(hf, torch_model)).max() > 1e-2
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


EXPERTS = (3, 8, 6)  # experts, dim, expert dim


def _torch_experts(torch):
  """A GPT-OSS-like MoE block: stacked expert parameters gate_up_proj (E,
  d, 2f) and down_proj (E, f, d), registered in that order, used as x @
  W[e]; every expert sees every token, weighted by a softmax router."""
  e, d, f = EXPERTS

  class Experts(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.gate_up_proj = torch.nn.Parameter(torch.randn(e, d, 2 * f) * 0.3)
      self.down_proj = torch.nn.Parameter(torch.randn(e, f, d) * 0.3)

    def forward(self, x, weights):
      h = torch.einsum("bd,edf->ebf", x, self.gate_up_proj)
      h = torch.nn.functional.silu(h[..., :f]) * h[..., f:]
      y = torch.einsum("ebf,efd->ebd", h, self.down_proj)
      return torch.einsum("ebd,be->bd", y, weights)

  class Mlp(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.router = torch.nn.Linear(d, e, bias=False)
      self.experts = Experts()

    def forward(self, x):
      return x + self.experts(x, torch.softmax(self.router(x), -1))

  class Model(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.mlp = Mlp()

    def forward(self, x):
      return self.mlp(x)

  torch.manual_seed(0)
  return Model().eval()


def _jax_experts(params, x):
  """The same block in JAX; each expert's product batched over the experts
  (layout batch=(0,))."""
  p = params["mlp"]
  e, _, f = EXPERTS
  weights = jax.nn.softmax(x @ p["router"]["kernel"], -1)
  xe = jnp.broadcast_to(x, (e, *x.shape))
  h = jnp.einsum("ebd,edf->ebf", xe, p["experts"]["gate_up_proj"])
  h = jax.nn.silu(h[..., :f]) * h[..., f:]
  y = jnp.einsum("ebf,efd->ebd", h, p["experts"]["down_proj"])
  return x + jnp.einsum("ebd,be->bd", y, weights)


EXPERT_NAMES = [(r"mlp/experts/(gate_up_proj|down_proj)", r"mlp.experts.\1")]


def test_target_parameters_experts_both_ways(hf, tmp_path):
  """PEFT's target_parameters on stacked experts: PEFT's file gives PEFT's
  outputs in lora_jax, save_peft's gives lora_jax's in PEFT."""
  torch, peft, _, _ = hf
  model = _torch_experts(torch)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = {"mlp": {"router": {"kernel": jnp.asarray(sd["mlp.router.weight"].T)},
                    "experts": {n: jnp.asarray(sd[f"mlp.experts.{n}"])
                                for n in ("gate_up_proj", "down_proj")}}}
  x = np.random.default_rng(0).normal(size=(5, EXPERTS[1])).astype(np.float32)
  with torch.no_grad():
    np.testing.assert_allclose(_jax_experts(params, x),
                               model(torch.tensor(x)).numpy(), atol=1e-5)
  pm = _random_lora(hf, peft.get_peft_model(
      copy.deepcopy(model), peft.LoraConfig(
          r=2, lora_alpha=4, target_modules=[],
          target_parameters=["experts.gate_up_proj", "experts.down_proj"])))
  with torch.no_grad():
    want, plain = (m(torch.tensor(x)).numpy() for m in (pm, model))
  assert np.abs(want - plain).max() > 1e-2
  pm.save_pretrained(tmp_path / "peft")
  base, delta, config = lj.load_peft(
      tmp_path / "peft", params, module_names=EXPERT_NAMES,
      apply_fn=_jax_experts, example_args=(x,))
  assert sorted(lj.adapters(delta)) == ["mlp/experts/down_proj",
                                        "mlp/experts/gate_up_proj"]
  np.testing.assert_allclose(lj.wrap(_jax_experts)(base, delta, x), want,
                             atol=1e-5, rtol=0)

  config = lj.LoraConfig(rank=2, alpha=4.0, targets=r"mlp/experts/.*")
  base, delta = lj.split(params, config, jax.random.key(0), _jax_experts,
                         (x,))
  delta = _randomized(delta)
  want = np.asarray(lj.wrap(_jax_experts)(base, delta, x))
  lj.save_peft(tmp_path / "lj", delta, config, module_names=EXPERT_NAMES,
               parameter_order=["gate_up_proj", "down_proj"])
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lj")
  with torch.no_grad():
    got = pm.eval()(torch.tensor(x)).numpy()
  assert np.abs(got - plain).max() > 1e-2
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


TOKEN_IDS = [3, 1, 7]


@pytest.mark.parametrize("kind", ["lora", "tokens"])
def test_trainable_tokens_both_ways(hf, models, kind, tmp_path):
  """Trainable tokens on GPT-2's wte (its lm_head tied), in a LoRA adapter
  (trainable_token_indices, with c_attn adapted) and alone
  (TrainableTokensConfig): PEFT's file gives PEFT's logits in lora_jax,
  save_peft's gives lora_jax's in PEFT."""
  torch, peft, _, _ = hf
  torch_model, flax_model = models["gpt2"]
  f = _flax_fn(flax_model)
  peft_config = peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["c_attn"],
      trainable_token_indices={"wte": TOKEN_IDS}) if kind == "lora" else (
          peft.TrainableTokensConfig(target_modules=["wte"],
                                     token_indices=TOKEN_IDS))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fan_in_fan_out for Conv1D
    pm = _random_lora(hf, peft.get_peft_model(copy.deepcopy(torch_model),
                                              peft_config))
  gen = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if n.endswith("trainable_tokens_delta.default"):
        p.copy_(torch.randn(p.shape, generator=gen))
  want = _torch_logits(hf, pm)
  assert np.abs(want - _torch_logits(hf, torch_model)).max() > 1e-1
  pm.save_pretrained(tmp_path / "peft")
  base, delta, config = lj.load_peft(tmp_path / "peft", flax_model.params,
                                     apply_fn=f, example_args=(IDS,))
  tokens = delta["transformer"]["wte"]["embedding"]
  assert isinstance(tokens, lj.TrainableTokens)
  assert tokens.indices == tuple(TOKEN_IDS)
  assert len(lj.adapters(delta)) == (2 if kind == "lora" else 0)
  got = np.asarray(jax.jit(lj.wrap(f))(base, delta, IDS))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  config = lj.LoraConfig(
      rank=2, alpha=4.0, trainable_tokens={".*/wte/embedding": TOKEN_IDS},
      targets=r".*/c_attn/kernel" if kind == "lora" else (
          r".*/h/0/attn/c_attn/kernel"),
      exclude=None if kind == "lora" else r".*")
  base, delta = lj.split(flax_model.params, config, jax.random.key(0), f,
                         (IDS,))
  delta = _randomized(delta)
  delta["transformer"]["wte"]["embedding"] = tokens.replace(
      values=tokens.values[::-1] * 3.0)
  want = np.asarray(jax.jit(lj.wrap(f))(base, delta, IDS))
  lj.save_peft(tmp_path / "lj", delta, config)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model),
                                        tmp_path / "lj").eval()
  got = _torch_logits(hf, pm)
  assert np.abs(got - _torch_logits(hf, torch_model)).max() > 1e-1
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_embed_tokens_head_is_tied_by_peft_itself(hf, tmp_path):
  """save_peft without tied_heads on a table named embed_tokens: PEFT's
  ensure_weight_tying (which save_peft sets) gives the tied lm_head the same
  delta, so the torch logits are those of the merged, still tied, table; and
  PEFT's file (with its lm_head copy) loads back to the same factors."""
  torch, peft, transformers, _ = hf
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1,
      max_position_embeddings=16, tie_word_embeddings=True)).eval()
  table = model.model.embed_tokens.weight.detach().numpy()
  params = {"model": {"embed_tokens": {"embedding": jnp.asarray(table)}}}
  config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/embedding")
  _, delta = lj.split(params, config, jax.random.key(0))
  delta = _np_filled(delta)
  lj.save_peft(tmp_path / "lj", delta, config)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lj")
  merged = copy.deepcopy(model)
  ids = torch.tensor(IDS[:, :4])
  with torch.no_grad():
    merged.model.embed_tokens.weight.copy_(torch.tensor(np.asarray(
        lj.merge(params, delta)["model"]["embed_tokens"]["embedding"])))
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    got, want = pm.eval()(ids).logits.numpy(), merged(ids).logits.numpy()
    assert np.abs(got - model(ids).logits.numpy()).max() > 1e-1
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  pm.save_pretrained(tmp_path / "peft")  # lm_head's copy and base weights
  _, loaded, _ = lj.load_peft(tmp_path / "peft", params)
  got = lj.adapters(loaded)["model/embed_tokens/embedding"]
  np.testing.assert_array_equal(got.a, delta["model"]["embed_tokens"][
      "embedding"].a)


def test_trainable_tokens_listed_in_the_config_but_missing(tmp_path):
  # a LoRA file whose trainable_token_indices names a table without its
  # token_adapter tensor loaded without the tokens, silently
  params = {"model": {"embed_tokens": {"embedding": jnp.ones((16, 8))},
                      "q_proj": {"kernel": jnp.ones((8, 8))}}}
  config = lj.LoraConfig(rank=2, targets=r".*q_proj/kernel",
                         trainable_tokens={".*/embedding": [5, 2]})
  _, delta = lj.split(params, config, jax.random.key(0))
  lj.save_peft(tmp_path, delta, config)
  path = tmp_path / "adapter_model.safetensors"
  tensors, meta = st.load_file(path)
  tensors.pop("base_model.model.model.embed_tokens.token_adapter."
              "trainable_tokens_delta")
  st.save_file(path, tensors, meta)
  with pytest.raises(lj.PeftFormatError, match=r"'trainable_token_indices' "
                     r".* lists trainable tokens of \['model.embed_tokens'\]"
                     r", but no key"):
    lj.load_peft(tmp_path, params)
