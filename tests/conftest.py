"""Test set-up: 8 fake CPU devices (must be set before jax is imported) and fp32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Equivalence tests compare against PyTorch fp32: use full-precision matmuls everywhere.
jax.config.update("jax_default_matmul_precision", "highest")


def needs_devices(count: int):
    """Skip a test that lays out a mesh of ``count`` devices where JAX has fewer (one GPU, say)."""
    import pytest

    return pytest.mark.skipif(jax.device_count() < count,
                              reason=f"needs {count} devices, JAX has {jax.device_count()}")
