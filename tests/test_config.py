import jax
import numpy as np
import pytest

import lora_jax as lj


def test_scale_plain_and_rslora():
  assert lj.LoraConfig(rank=8, alpha=16.0).scale == 2.0
  assert lj.LoraConfig(rank=16, alpha=8.0, rslora=True).scale == 2.0


def test_frozen_hashable_and_normalised():
  a = lj.LoraConfig(rank=4, targets=["a", "b"], layouts={"x": lj.Layout.dense()})
  b = lj.LoraConfig(rank=4, targets=("a", "b"), layouts=[("x", lj.Layout.dense())])
  assert a == b and hash(a) == hash(b)
  assert a.targets == ("a", "b")
  with pytest.raises(AttributeError):
    a.rank = 3  # frozen
  # usable as a static argument of jit
  f = jax.jit(lambda cfg, x: x * cfg.scale, static_argnums=0)
  assert float(f(a, 1.0)) == 4.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be >= 1"),
    (dict(rank=2.5), "rank must be an int"),
    (dict(alpha=0.0), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(targets="("), "not a valid regular expression"),
    (dict(targets=[]), "must be a regex string"),
    (dict(targets=None), "must not be None"),
    (dict(init="xavier"), "init must be one of"),
    (dict(dtype=np.int32), "must be a floating dtype"),
    (dict(layouts={"k": (0, 1)}), "must be a lora_jax.Layout"),
])
def test_invalid_config_messages(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    lj.LoraConfig(**kwargs)


def test_targets_forms():
  leaf = np.zeros((4, 4))
  regex = lj.LoraConfig(targets=r".*/q/kernel")
  assert regex.is_target("h0/q/kernel", leaf)
  assert not regex.is_target("h0/q/kernel2", leaf)  # full match only
  many = lj.LoraConfig(targets=[r".*/q/kernel", r".*/v/kernel"],
                       exclude=r"h1/.*")
  assert many.is_target("h0/v/kernel", leaf)
  assert not many.is_target("h1/v/kernel", leaf)  # exclude wins
  fn = lj.LoraConfig(targets=lambda p, x: x.shape[0] == 4)
  assert fn.is_target("anything", leaf)
  lin = lj.LoraConfig(targets="all-linear")
  assert lin.is_target("fc/kernel", leaf)
  assert not lin.is_target("fc/bias", np.zeros(4))
  assert not lin.is_target("emb/embedding", leaf)


def test_layout_validation():
  with pytest.raises(ValueError, match="exactly one role"):
    lj.Layout((), (0,), (0,))
  with pytest.raises(ValueError, match="at least one input axis"):
    lj.Layout((0,), (), (1,))
  lay = lj.Layout((0,), (2,), (1,))
  assert lay.factor_shapes((3, 5, 7), 2) == ((3, 7, 2), (3, 2, 5))
  assert lay.kernel_shape((3, 7, 2), (3, 2, 5)) == (3, 5, 7)
  assert lay.max_rank((3, 5, 7)) == 5


def test_numpy_scalars_are_accepted_and_normalised():
  cfg = lj.LoraConfig(rank=np.int64(4), alpha=np.float32(8.0),
                      dropout=np.float32(0.1), rslora=np.bool_(True),
                      rank_pattern={"q": np.int32(2)},
                      alpha_pattern={"q": np.float16(3.0)})
  assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora) == (4, 8.0, 0.1, True)
  assert type(cfg.rank) is int and type(cfg.dropout) is float
  assert type(cfg.rslora) is bool
  assert list(cfg.rank_pattern) == [("q", 2)] and list(cfg.alpha_pattern) == [("q", 3.0)]
  assert cfg == lj.LoraConfig(rank=4, alpha=8.0, dropout=0.1, rslora=True,
                              rank_pattern={"q": 2}, alpha_pattern={"q": 3.0})
  with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got np.float32\(1.5\)|"
                     r"dropout must be in \[0, 1\), got 1.5"):
    lj.LoraConfig(dropout=np.float32(1.5))


def test_pattern_maps_compile_once_first_match_wins():
  cfg = lj.LoraConfig(rank=8, rank_pattern=[(r".*/q/kernel", 2), (r".*", 4)],
                      alpha_pattern={r"h0/.*": 1.0},
                      layouts={r".*/out/kernel": lj.Layout.transposed()})
  assert cfg.rank_for("h0/q/kernel") == 2 and cfg.rank_for("h1/k/kernel") == 4
  assert cfg.scale_for("h0/q/kernel") == 0.5 and cfg.scale_for("h1/q/kernel") == 8.0
  assert cfg.layout_for("h1/out/kernel") == lj.Layout.transposed()
  assert cfg.layout_for("h1/q/kernel") is None
  # dict and list forms normalise to the same hashable map
  same = lj.LoraConfig(rank=8, rank_pattern={r".*/q/kernel": 2, r".*": 4},
                       alpha_pattern=[(r"h0/.*", 1.0)],
                       layouts=[(r".*/out/kernel", lj.Layout.transposed())])
  assert cfg == same and hash(cfg) == hash(same)
  with pytest.raises(ValueError, match=r"LoraConfig.rank_pattern: '\[' is not a "
                     r"valid regular expression"):
    lj.LoraConfig(rank_pattern={"[": 2})
  with pytest.raises(TypeError, match=r"LoraConfig.layouts must be a dict"):
    lj.LoraConfig(layouts=5)


@pytest.mark.parametrize("init, kind, niter, principal", [
    ("default", "default", None, False), ("gaussian", "gaussian", None, False),
    ("pissa", "pissa", None, True), ("pissa_niter_16", "pissa", 16, True),
    ("olora", "olora", None, True)])
def test_init_parsed_once(init, kind, niter, principal):
  spec = lj.LoraConfig(init=init).init_spec
  assert (spec.kind, spec.niter, spec.principal) == (kind, niter, principal)
  assert lj.LoraConfig(init=lambda *a: a).init_spec.kind == "callable"
  with pytest.raises(ValueError, match="init must be one of"):
    lj.LoraConfig(init="pissa_niter_x")


def test_json_round_trip():
  cfg = lj.LoraConfig(rank=4, alpha=6.0, targets=[r".*/q/kernel", r".*/v/kernel"],
                      exclude=r"h1/.*", init="pissa_niter_2", rslora=True,
                      dtype=jax.numpy.bfloat16, dropout=0.05, dora=True,
                      layouts={r".*/out/kernel": lj.Layout((0,), (1,), (2,))},
                      rank_pattern={r".*/q/kernel": 2}, alpha_pattern={r".*": 3.0})
  data = cfg.to_json()
  import json
  assert lj.LoraConfig.from_json(json.loads(json.dumps(data))) == cfg
  assert data["scale"] == cfg.scale and data["dtype"] == "bfloat16"
  assert lj.LoraConfig.from_json(lj.LoraConfig().to_json()) == lj.LoraConfig()
  fn = lambda p, x: True
  with_fn = lj.LoraConfig(targets=fn, exclude=fn)
  assert with_fn.to_json()["targets"] == {
      "callable": "test_json_round_trip.<locals>.<lambda>"}
  with pytest.raises(ValueError, match=r"targets was a callable \(test_json_round_trip"
                     r".<locals>.<lambda>\), which JSON cannot hold; pass it again: "
                     r"LoraConfig.from_json\(data, targets=<the function>\)"):
    lj.LoraConfig.from_json(with_fn.to_json())
  assert lj.LoraConfig.from_json(with_fn.to_json(), targets=fn, exclude=fn) == with_fn
  with pytest.raises(ValueError, match=r"unknown fields \['rnak'\]"):
    lj.LoraConfig.from_json({"rnak": 2})
  with pytest.raises(ValueError, match=r"LoraConfig.rank must be >= 1"):
    lj.LoraConfig.from_json({"rank": 0})


@pytest.mark.parametrize("field, value", [
    ("rank_pattern", {r".*/qq/kernel": 2}),
    ("alpha_pattern", {r"dense/kernal": 2.0}),
    ("exclude", r".*/bais"),
    ("exclude", [r"dense/kernel", r"typo"]),
    ("layouts", {r"dense/w": lj.Layout.dense()}),
    ("targets", r"dense/kernal"),
])
def test_regex_that_matches_nothing_is_an_error(field, value):
  params = {"dense": {"kernel": np.ones((4, 4), np.float32),
                      "bias": np.zeros(4, np.float32)}}
  cfg = lj.LoraConfig(rank=2, **{"targets": r"dense/kernel", field: value})
  bad = [p for p in ([value] if isinstance(value, str) else list(value))
         if p != "dense/kernel"][0]
  with pytest.raises(ValueError, match=(
      rf"LoraConfig.{field}: the regex '{bad}' matches no leaf path \(full "
      rf"match on '/'-joined paths\). Some paths that exist: \['dense/bias', "
      rf"'dense/kernel'\]")):
    lj.split(params, cfg, jax.random.key(0))
