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

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # lets tests import experiments.<name> like launch.py does
  sys.path.insert(0, ROOT)


def launch(*args, devices: int = 1, timeout: float = 300, env=None, check=False):
  """Runs `python launch.py ARGS` in a subprocess on `devices` simulated CPU devices."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                  XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        env=full_env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"launch {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


@pytest.fixture
def run_launch():
  return launch
