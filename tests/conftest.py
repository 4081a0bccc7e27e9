"""Shared test set-up: 8 simulated CPU devices (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated devices for the mesh tests; LLVM optimisation off because the suite is
# dominated by XLA:CPU compile time of tiny programs (3x faster, same numerics checks).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: multi-process runs of the CLI (minutes); "
                          "`pytest -m 'not slow'` leaves them out")
