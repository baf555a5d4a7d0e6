"""Test setup: 8 fake CPU devices, set before JAX initialises its backend (env-notes G17)."""
import os

# (--xla_backend_optimization_level=0 would halve CPU compile times but changes fp32 results by ~1e-6, enough
# to break the 1e-6 sharded-vs-unsharded checks, so it is not used.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8) if jax.config.jax_num_cpu_devices != 8 else None

import pytest  # noqa: E402


@pytest.fixture
def highest_precision():
    """fp32 parity tests run under highest matmul precision (tolerances in the tests assume it)."""
    with jax.default_matmul_precision("highest"):
        yield
