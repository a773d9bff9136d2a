"""Two real JAX processes on loopback stand in for two hosts of a pod.

Each process has one CPU device, loads only its half of every batch, and reaches the other
through jax.distributed (gloo collectives). Compared with one process holding both devices the
program is the same and an all-reduce of two numbers is exact, so the losses must be bitwise
equal; against one device only float reduction order differs.
"""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import SMOKE20, launch, read_losses, spawn_processes

pytestmark = pytest.mark.slow
TIMEOUT_S = 240


def _wait_all(procs, timeout=TIMEOUT_S):
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"processes still running after {timeout} s (a hang)")
  return codes


def _logs(log_dir):
  return "\n".join(
    f"--- {name}\n" + (log_dir / name).read_text()[-3000:]
    for name in sorted(os.listdir(log_dir))
    if name.endswith(".log")
  )


def _wait_for_steps(workdir, steps, procs, timeout=TIMEOUT_S):
  """Blocks until metrics.jsonl holds `steps` records (the job is mid-run)."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and len(read_losses(workdir)) >= steps:
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError("a process ended before the job got going")
    time.sleep(0.05)
  raise AssertionError(f"no {steps} steps logged within {timeout} s")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """SMOKE20 as a two-process job; returns its workdir."""
  base = tmp_path_factory.mktemp("two_process")
  procs = spawn_processes(*SMOKE20, f"--workdir={base / 'run'}", n=2, log_dir=base)
  codes = _wait_all(procs)
  assert codes == [0, 0], _logs(base)
  return base / "run"


def test_two_processes_equal_one_process_with_two_devices(
  two_process_run, reference_losses, tmp_path
):
  losses = read_losses(two_process_run)
  assert losses == reference_losses  # bitwise
  one_device = tmp_path / "one_device"
  launch(*SMOKE20, f"--workdir={one_device}", devices=1, check=True)
  single = read_losses(one_device)
  assert sorted(single) == sorted(losses)
  np.testing.assert_allclose(
    [losses[s] for s in sorted(losses)], [single[s] for s in sorted(single)], rtol=1e-6, atol=1e-6
  )
  # Both processes wrote their shards into the one checkpoint folder.
  final = two_process_run / "checkpoints" / "20" / "state"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(final))


def test_resume_with_another_process_count_stops_with_a_diff(two_process_run):
  proc = launch(*SMOKE20, f"--workdir={two_process_run}", "--config.train.steps=22", devices=1)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "topology.process_count: 2 -> 1" in proc.stderr
  assert "--allow_config_change" in proc.stderr


def test_sigkill_of_one_process_ends_the_other_quickly(tmp_path):
  workdir = tmp_path / "run"
  procs = spawn_processes(
    *SMOKE20,
    f"--workdir={workdir}",
    "--config.train.steps=200",
    "--config.debug.step_delay_s=0.2",
    n=2,
    log_dir=tmp_path,
    heartbeat_s=5,
  )
  _wait_for_steps(workdir, 3, procs)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  code = _wait_all(procs[:1], timeout=60)[0]
  assert time.time() - killed_at < 15, _logs(tmp_path)
  assert code != 0
  procs[1].wait()


def test_sigterm_to_one_process_saves_the_same_step_everywhere(tmp_path, reference_losses):
  workdir = tmp_path / "run"
  slow = "--config.debug.step_delay_s=0.3"
  procs = spawn_processes(*SMOKE20, f"--workdir={workdir}", slow, n=2, log_dir=tmp_path)
  _wait_for_steps(workdir, 6, procs)
  procs[1].send_signal(signal.SIGTERM)
  assert _wait_all(procs) == [0, 0], _logs(tmp_path)
  saved = []
  for i in range(2):
    text = (tmp_path / f"process{i}.log").read_text()
    saved.append(int(text.split("stopped at step ")[1].split()[0]))
  assert saved[0] == saved[1] < 20
  assert os.path.isdir(workdir / "checkpoints" / str(saved[0]))
  assert not os.path.isdir(workdir / "checkpoints" / "20")

  (tmp_path / "again").mkdir()
  procs = spawn_processes(*SMOKE20, f"--workdir={workdir}", n=2, log_dir=tmp_path / "again")
  assert _wait_all(procs) == [0, 0], _logs(tmp_path / "again")
  assert f"resumed at step {saved[0]}" in (tmp_path / "again" / "process0.log").read_text()
  assert read_losses(workdir) == reference_losses  # bitwise, no step lost or repeated
