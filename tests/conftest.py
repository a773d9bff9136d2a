"""Test-wide JAX settings: CPU, 8 simulated devices, strict rank promotion, float32."""

import os

# Must happen before JAX initialises its backends. Eight simulated CPU devices let the sharding
# tests run the real data-parallel path; single-device tests are unaffected.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
