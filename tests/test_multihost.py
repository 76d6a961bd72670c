"""Two processes on localhost run one LoRA training step on a global mesh."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

import lora_jax as lj


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(args, **kw):
  # the example sets its own device count; the suite's other XLA flags (its
  # compile-time savings, tests/conftest.py) carry over
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
  return subprocess.Popen([sys.executable, "-m", "lora_jax.examples.multihost",
                           *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  common = ["--steps", "4", "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2", "--devices-per-process", "4",
            "--out", str(tmp_path / "multi")]
  procs = [_run([*common, "--process-id", str(i)]) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  multi = json.loads(outs[0][0].strip().splitlines()[-1])
  single_proc = _run(["--steps", "4", "--devices-per-process", "8",
                      "--out", str(tmp_path / "single")])
  out, err = single_proc.communicate(timeout=240)
  assert single_proc.returncode == 0, err[-3000:]
  single = json.loads(out.strip().splitlines()[-1])
  assert multi["processes"] == 2 and multi["devices"] == 8
  assert single["processes"] == 1 and single["devices"] == 8
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-4)
  assert multi["losses"][-1] < multi["losses"][0]
  # the checkpoint both processes wrote restores here, in one process
  written = lj.adapters(lj.load(tmp_path / "multi"))
  reference = lj.adapters(lj.load(tmp_path / "single"))
  assert set(written) == {"fc1", "fc2"}
  for path in written:
    np.testing.assert_allclose(np.asarray(written[path].a),
                               np.asarray(reference[path].a), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(written[path].b),
                               np.asarray(reference[path].b), rtol=1e-4, atol=1e-6)
