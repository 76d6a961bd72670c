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
