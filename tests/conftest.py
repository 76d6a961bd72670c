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
  return [", ".join(versions), f"lora_jax from {_lora_jax_dir()}"]
