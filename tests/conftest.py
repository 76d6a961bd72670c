"""Test-process set-up: eight simulated CPU devices for the sharding tests.

XLA reads the flag when JAX first starts its backend, so it is set here,
before any test imports jax. Every other test runs on the first device.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
