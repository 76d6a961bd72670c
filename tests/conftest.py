"""Test-process set-up: eight simulated CPU devices for the sharding tests,
and XLA:CPU without its LLVM optimisations (a third of the suite's time).

XLA reads the flag when JAX first starts its backend, so it is set here,
before any test imports jax. Every other test runs on the first device.

The report header names the versions under test and where lora_jax is
imported from; CI sets LORA_JAX_EXPECT_DIR when the suite must exercise an
installed wheel, and the run stops if lora_jax would come from elsewhere.
"""

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The tests compile about a thousand small programs: LLVM's optimisations of
# XLA:CPU's code take a third of the suite's time and change nothing the tests
# check (HLO, buffer sizes and sharding are decided before LLVM; values differ
# by float rounding only). LORA_JAX_TEST_XLA_OPT=1 keeps XLA's defaults;
# subprocesses (notebooks, multi-host) inherit the flags.
if (os.environ.get("LORA_JAX_TEST_XLA_OPT") != "1"
    and "xla_backend_optimization_level" not in _flags):
  _flags += (" --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")
# XLA:CPU's fusion emitters (jaxlib <= 0.10) take about twice the CPU of its
# older emitters to compile the small programs tests are made of: the flag
# cut test_variants + test_quant_engines from 90 to 58 CPU-s on jax 0.10.2.
# Newer XLA has no such flag, and XLA aborts the process on a flag it does
# not know, so it is added only where a child process accepts it (checked
# once: pytest-xdist's workers and the tests' subprocesses inherit the
# result through the environment).
_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if (os.environ.get("LORA_JAX_TEST_XLA_OPT") != "1"
    and "xla_cpu_use_fusion_emitters" not in _flags
    and "LORA_JAX_TEST_EMITTERS_PROBED" not in os.environ):
  _probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()"],
      env={**os.environ, "XLA_FLAGS": f"{_flags} {_EMITTERS}".strip(),
           "JAX_PLATFORMS": "cpu"},
      capture_output=True, check=False)
  if _probe.returncode == 0:
    _flags += " " + _EMITTERS
  os.environ["LORA_JAX_TEST_EMITTERS_PROBED"] = str(_probe.returncode == 0)
os.environ["XLA_FLAGS"] = _flags.strip()

_VERSIONED = ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy")


def _lora_jax_dir() -> str:
  spec = importlib.util.find_spec("lora_jax")  # finds it without importing jax
  return os.path.dirname(spec.origin) if spec and spec.origin else "<not found>"


def pytest_configure(config):
  expected = os.environ.get("LORA_JAX_EXPECT_DIR")
  if expected and os.path.realpath(_lora_jax_dir()) != os.path.realpath(expected):
    raise pytest.UsageError(
        f"lora_jax would be imported from {_lora_jax_dir()}, not from "
        f"LORA_JAX_EXPECT_DIR={expected}; run pytest outside the checkout.")


def pytest_report_header(config):
  versions = [f"python {platform.python_version()}"]
  for name in _VERSIONED:
    try:
      versions.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      versions.append(f"{name} missing")
  return [", ".join(versions), f"lora_jax from {_lora_jax_dir()}",
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"]
