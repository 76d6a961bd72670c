"""The demo end to end, with few steps: pretrain, LoRA, save, reload, merge."""

import io
import os

import pytest

import lora_jax as lj
from lora_jax.examples import demo
from lora_jax.__main__ import _main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  return demo.main(["--steps-pretrain", "150", "--steps-lora", "100",
                    "--batch", "32", "--out", str(out), "--quiet"])


def test_merged_model_predicts_like_wrapped(results):
  assert results["factors_equal"]
  assert results["max_merge_diff"] < 1e-5  # vs wrap(mode="merge")
  assert results["max_engine_diff"] < 1e-2  # vs wrap() as trained: rounding
  assert results["argmax_equal"]
  assert results["ok"]


def test_lora_learns_task2_and_keeps_the_base(results):
  assert results["task1_accuracy"] > 0.9  # pretraining learned to copy
  assert results["task2_loss_after"] < 0.5 * results["task2_loss_before"]
  before, after = (results["task2_accuracy_before"],
                   results["task2_accuracy_after"])
  assert after > before + 0.2
  assert results["task1_accuracy_base_after_lora"] == results["task1_accuracy"]


def test_adapter_is_small(results):
  assert 0 < results["trainable_fraction"] < 0.1
  assert results["trainable_params"] < 0.1 * results["params"]
  assert 0 < results["adapter_bytes"] < results["params_bytes"]
  files = [f for _, _, fs in os.walk(results["adapter_dir"]) for f in fs]
  assert "lora_jax.json" in files
  assert len(lj.load(results["adapter_dir"])) == 2  # block0, block1
  assert results["step_ms_full"] > 0 and results["step_ms_lora"] > 0


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


def test_exit_status_is_1_when_merged_and_wrapped_disagree(monkeypatch,
                                                           tmp_path):
  monkeypatch.setattr(lj, "merge", lambda base, delta: base)  # drop the adapter
  argv = ["--steps-pretrain", "1", "--steps-lora", "1", "--batch", "4",
          "--out", str(tmp_path), "--quiet"]
  assert demo.cli(argv) == 1


def test_three_way_table(results):
  runs = results["runs"]
  assert set(runs) == {"LoRA factored", "LoRA merge", "full fine-tuning"}
  for r in runs.values():
    assert len(r["curve"]) == 100 and r["curve"][-1] < r["curve"][0]
    assert r["step_ms"] > 0 and r["memory_bytes"] > 0
  # the two engines train the same model on the same batches
  lf, lm = runs["LoRA factored"]["curve"], runs["LoRA merge"]["curve"]
  assert abs(lf[0] - lm[0]) < 1e-4 * abs(lm[0])
  assert results["adapter_bytes"] < results["full_checkpoint_bytes"]
  assert results["plot"] is None or os.path.getsize(results["plot"]) > 1000
