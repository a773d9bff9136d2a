"""Test-wide JAX settings: CPU, 8 simulated devices, strict rank promotion, float32."""

import os

# Must happen before JAX initialises its backends. Eight simulated CPU devices let the sharding
# tests run the real data-parallel path; single-device tests are unaffected.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is bound by XLA compile time (hundreds of small, distinct programs). Level 0 leaves
# the HLO as it is and only spends less time in LLVM's code generation: on the 2-core CPU,
# scan_test + sampling_test took 80 s at the default level and 58 s at 0. Tests check what a
# program computes, never its speed; the benchmarks (tests/benchmarks_test.py) and every
# measured run in the README compile at the default level.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"
).strip()

import tempfile  # noqa: E402

# Shared caches (the WordPiece tokenizer) go to a throwaway folder, not the user's ~/.cache.
os.environ.setdefault("MASKAX_CACHE", tempfile.mkdtemp(prefix="maskax-test-cache-"))
# One persistent XLA compilation cache for the session, shared by this process and every launch
# subprocess: the suite
# compiles the same smoke models dozens of times (a char_rnn smoke launch takes 25 s cold,
# 17.6 s with the cache warm; its losses are bitwise the same either way).
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="maskax-test-xla-cache-")
)
# Only compilations of a second or more: writing every tiny jit to disk costs more than it saves.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# A size bound turns on the cache's file lock (filelock), which processes that read and write
# the cache at the same time (a two-process launch) need.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # lets tests import experiments.<name> like launch.py does
  sys.path.insert(0, ROOT)


def launch(*args, devices: int = 1, timeout: float = 300, env=None, check=False, cwd=ROOT):
  """Runs `python launch.py ARGS` in a subprocess on `devices` simulated CPU devices."""
  full_env = _env(devices, env)
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch.py"), *args],
    cwd=cwd,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"launch {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def launch_here(*args, cwd=ROOT, check=False) -> subprocess.CompletedProcess:
  """Runs `launch.py ARGS` in this process: what `launch` does, without starting Python and JAX.

  For tests whose subject is not the process itself (a kill, a signal, several processes, a
  lock between two launches, the device count): the same `launch.run()`, flags parsed afresh,
  stdout and every log record captured, a `SystemExit` turned into the return code. It runs on
  this process's 8 simulated devices. Returns what `subprocess.run` would.
  """
  import launch as launcher  # defines the absl flags, once per process
  from absl import flags

  out, err = io.StringIO(), io.StringIO()
  # absl records propagate to the root logger. Not a StreamHandler: absl's first app.run removes
  # root StreamHandlers that write to sys.stderr, which is `err` while the launch runs.
  handler = logging.Handler()
  handler.emit = lambda record: err.write(handler.format(record) + "\n")
  old_argv, old_cwd = sys.argv, os.getcwd()
  sys.argv, code = ["launch.py", *args], 0
  logging.getLogger().addHandler(handler)
  absl_logger = logging.getLogger("absl")
  old_level = absl_logger.level
  absl_logger.setLevel(logging.INFO)  # what a launch prints; pytest leaves the root at WARNING
  os.chdir(cwd)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        launcher.run()
      except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("error: ...") prints it, as Python's exit does
          print(e.code, file=err)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
  finally:
    flags.FLAGS.unparse_flags()  # the next launch_here starts from every flag's default
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)  # --config defines one flag per field of the file it loads
    sys.argv = old_argv
    os.chdir(old_cwd)
    logging.getLogger().removeHandler(handler)
    absl_logger.setLevel(old_level)
  if check and code != 0:
    raise AssertionError(f"launch {args} failed ({code}):\n{err.getvalue()[-4000:]}")
  return subprocess.CompletedProcess(["launch.py", *args], code, out.getvalue(), err.getvalue())


def resume_to_six(args, workdir, *extra) -> list[dict]:
  """Reruns a finished 4-step smoke run (`launch(*args)`) to step 6 and checks that it resumed
  at step 4, wrote checkpoint 6 and logged training at steps 2, 4, 6 exactly once each.
  Returns the records of WORKDIR/metrics.jsonl for the test's own checks."""
  proc = launch_here(*args, "--config.train.steps=6", *extra, check=True)
  log = proc.stdout + proc.stderr[-3000:]
  assert "resumed at step 4" in proc.stderr, log
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6")), log
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
  return records


def pytest_collection_modifyitems(items):
  """A test that needs an experiment's trained smoke run (the `trained_smoke` fixture trains it)
  is an end-to-end run, so `slow`: `-m "not slow"` leaves out every training run."""
  for item in items:
    if "trained_smoke" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.slow)


@pytest.fixture
def run_launch():
  return launch


def _env(devices: int, env=None, *, xla_flags: str = TEST_XLA_FLAGS) -> dict:
  full_env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip(),
  )
  full_env.update(env or {})
  return full_env


def spawn(*args, log_path, devices: int = 1, env=None, python_args=()) -> subprocess.Popen:
  """Starts `python [PYTHON_ARGS] launch.py ARGS` without waiting; stdout+stderr -> log_path.

  A file, not a pipe: a child that logs a lot can never block on a full pipe. `python_args`
  replaces `launch.py` when given (e.g. `("-c", CODE)` for a patched launcher).
  """
  command = list(python_args) or [os.path.join(ROOT, "launch.py")]
  with open(log_path, "w") as log:
    return subprocess.Popen(
      [sys.executable, *command, *args],
      cwd=ROOT,
      env=_env(devices, env),
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def free_port() -> int:
  """A loopback port nobody listens on (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def spawn_processes(*args, n: int, log_dir, heartbeat_s: int = 5, devices: int = 1):
  """Starts an `n`-process jax.distributed job on loopback; returns the Popens by process id."""
  address = f"127.0.0.1:{free_port()}"
  return [
    spawn(
      *args,
      f"--coordinator_address={address}",
      f"--num_processes={n}",
      f"--process_id={i}",
      f"--heartbeat_timeout_s={heartbeat_s}",
      log_path=os.path.join(log_dir, f"process{i}.log"),
      devices=devices,
    )
    for i in range(n)
  ]


def read_losses(workdir) -> dict:
  """`{step: loss}` from `workdir/metrics.jsonl` (floats parsed from their repr: bitwise)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


# The uninterrupted run the preemption and multi-process tests compare with: 20 steps of the
# example experiment, a loss record per step, checkpoints every 5 steps.
SMOKE20 = (
  "--config=tests/fixtures/debug_regression.py:smoke",
  "--config.train.steps=20",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=5",
)


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory):
  """`{step: loss}` of SMOKE20 in one process with 2 simulated devices (run once per session)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  launch(*SMOKE20, f"--workdir={workdir}", devices=2, check=True)
  losses = read_losses(workdir)
  assert sorted(losses) == list(range(1, 21))
  return losses
