"""The demo end to end, with few steps: pretrain, LoRA, save, reload, merge."""

import io
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj
from lora_jax.__main__ import _main
from lora_jax.examples import demo


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  return demo.main(["--steps-pretrain", "150", "--steps-lora", "100",
                    "--batch", "32", "--out", str(out), "--quiet",
                    "--no-w3-memory"])


def test_merged_model_predicts_like_wrapped(results):
  check = results.check
  assert check.factors_equal and check.arrays == 24
  assert check.max_merge_diff < 1e-5  # vs wrap(mode="merge")
  assert check.max_engine_diff < 1e-2  # vs wrap() as trained: rounding
  assert check.argmax_equal
  assert results.ok


def test_lora_learns_task2_and_keeps_the_base(results):
  lora = results.runs[demo.FACTORED].score
  assert results.pretrained.accuracy > 0.9  # pretraining learned to copy
  assert lora.loss < 0.5 * results.before.loss
  assert lora.accuracy > results.before.accuracy + 0.2
  assert results.base_copy.accuracy == results.pretrained.accuracy


def test_adapter_is_small(results):
  lora, full = results.runs[demo.FACTORED], results.runs[demo.FULL]
  assert lora.trainable == 18_432 and full.trainable == results.params
  assert 0 < lora.trainable / (results.params + lora.trainable) < 0.1
  assert lora.trainable < 0.1 * results.params
  assert 0 < lora.disk_bytes < results.params_bytes
  files = [f for _, _, fs in os.walk(results.adapter_dir) for f in fs]
  assert "lora_jax.json" in files
  assert len(lj.load(results.adapter_dir)) == 2  # block0, block1
  assert full.step_ms > 0 and lora.step_ms > 0


class _Stream(io.StringIO):

  def __init__(self, tty):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


def test_progress_bar_without_a_terminal_prints_ten_lines():
  stream = _Stream(tty=False)
  bar = demo.Progress(100, "train", stream=stream)
  for i in range(1, 101):
    bar.update(i, lambda: 0.5)
  lines = stream.getvalue().splitlines()
  assert len(lines) == 10 and "\r" not in stream.getvalue()
  assert lines[-1].startswith("train [") and "100/100 loss 0.5000" in lines[-1]
  assert lines[-1].endswith(" it/s")


def test_progress_bar_on_a_terminal_redraws_in_place():
  stream = _Stream(tty=True)
  bar = demo.Progress(1000, "train", stream=stream)
  for i in range(1, 1001):
    bar.update(i, lambda: 0.5)
  text = stream.getvalue()
  last = text.rsplit("\r", 1)[-1]
  assert text.startswith("\r") and text.count("\n") == 1  # one line, redrawn
  assert "1000/1000 loss 0.5000" in last and last.endswith(" it/s\n")


def test_progress_bar_can_be_off():
  stream = _Stream(tty=True)
  demo.Progress(3, "train", enabled=False, stream=stream).update(3, lambda: 1.)
  assert stream.getvalue() == ""


def test_command_line(capsys):
  with pytest.raises(SystemExit) as e:
    demo.cli(["--help"])
  assert e.value.code == 0
  assert "--steps-lora" in capsys.readouterr().out
  assert _main(["no-such-command"]) == 2


def test_the_merge_check_catches_a_merge_that_drops_the_adapter(
    monkeypatch, tmp_path):
  # The check main() reports (and cli() turns into the exit status), on a
  # small model: it passes, then fails once lj.merge drops the adapter.
  model = nn.Dense(6)
  x = jax.random.normal(jax.random.key(0), (4, 5))
  params = model.init(jax.random.key(1), x)["params"]
  base, delta = lj.split(params, lj.LoraConfig(rank=2), jax.random.key(2))
  delta = jax.tree.map(lambda d: d.replace(b=jnp.ones_like(d.b)), delta,
                       is_leaf=lambda d: isinstance(d, lj.LoraDelta))
  saved = lj.save(tmp_path / "adapter", delta)
  fn = lambda p, x: model.apply({"params": p}, x)
  good = demo.check_merge(fn, base, delta, saved, x)
  assert good.ok and good.factors_equal and good.arrays == 2
  assert good.max_merge_diff < 1e-5
  monkeypatch.setattr(lj, "merge", lambda base, delta: base)
  bad = demo.check_merge(fn, base, delta, saved, x)
  assert not bad.ok and bad.max_merge_diff > 0.1


def test_exit_status_is_the_checks(monkeypatch):
  for ok, status in ((True, 0), (False, 1)):
    monkeypatch.setattr(demo, "main", lambda argv, prog, ok=ok: type(
        "R", (), {"ok": ok})())
    assert demo.cli(["--quiet"]) == status


def test_four_way_table(results):
  runs = results.runs
  assert list(runs) == ["LoRA factored", "LoRA merge", "full fine-tuning",
                        "QLoRA nf4"]
  for r in runs.values():
    assert len(r.curve) == 100 and r.curve[-1] < r.curve[0]
    assert r.step_ms > 0 and r.memory_bytes > 0
  # the two engines train the same model on the same batches
  lf, lm = runs["LoRA factored"].curve, runs["LoRA merge"].curve
  assert abs(lf[0] - lm[0]) < 1e-4 * abs(lm[0])
  assert runs["LoRA factored"].disk_bytes < runs["full fine-tuning"].disk_bytes
  assert results.plot is None or os.path.getsize(results.plot) > 1000
  lines = demo.table(runs, results.params)
  assert [l.split("  ")[0].strip() for l in lines[2:]] == list(runs)


def test_qlora_learns_like_lora(results):
  lora, qlora = results.runs["LoRA factored"], results.runs["QLoRA nf4"]
  threshold = results.before.accuracy + 0.2  # what LoRA must reach above
  assert lora.score.accuracy > threshold and qlora.score.accuracy > threshold
  # this short run: LoRA 44.9%, QLoRA 45.7% of answer tokens
  assert abs(qlora.score.accuracy - lora.score.accuracy) < 0.05
  assert qlora.score.loss < 0.5 * results.before.loss
  assert qlora.curve[0] == pytest.approx(lora.curve[0], rel=0.05)


def test_memory_ordering_where_parameters_dominate():
  # W3's shapes scaled down to stay fast, with the vocabulary that makes
  # parameters (not activations) fill memory: the demo's W3 line's measure.
  size = demo.w3_size(d_model=256, layers=2, heads=4, mlp=1024, seq=32)
  mem = demo.w3_memory(size)
  assert mem["QLoRA nf4"] < mem["LoRA factored"] < mem["full fine-tuning"]
  assert mem["LoRA factored"] < 0.5 * mem["full fine-tuning"]


def test_memory_lines_say_where_memory_is_saved():
  run = lambda mem: demo.Run(demo.Score(0., 1.), [1.], 1, 1., mem)
  runs = {demo.FACTORED: run(60), demo.FULL: run(50), demo.QLORA: run(55)}
  here, w3 = demo.memory_lines(runs, None)
  assert here.startswith("memory here: activations")
  assert here.endswith("LoRA 1.20x and QLoRA 1.10x full fine-tuning's")
  assert w3.startswith("W3 size: not measured")
  runs[demo.FULL] = run(70)
  mib = {demo.FULL: 2048 * 2**20, demo.FACTORED: 512 * 2**20,
         demo.QLORA: 256 * 2**20}
  here, w3 = demo.memory_lines(runs, mib)
  assert here == "memory here: QLoRA < LoRA < full fine-tuning"
  assert w3.endswith("full 2,048 MiB, LoRA 512 MiB (0.25x), "
                     "QLoRA nf4 256 MiB (0.12x)")
