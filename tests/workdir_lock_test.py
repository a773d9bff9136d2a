"""One run per workdir: the lock names its holder, dies with it, and can be waited for."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import launch, launch_here, spawn
from maskax.training import workdir_lock

# A separate process holds the lock (flock is per open file, so a second open in this process
# would conflict too, but a real holder is what users meet).
_HOLD = """
import sys, time
from maskax.training import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _holder(workdir, seconds=60.0):
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(workdir), str(seconds)], stdout=subprocess.PIPE, text=True
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_holder_is_refused_with_the_holders_name(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    message = str(error.value)
    assert f"in use by pid {proc.pid} on host" in message
    assert "--wait_for_workdir_s" in message
  finally:
    proc.kill()
    proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == proc.pid
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  with caplog.at_level("INFO"):
    lock.acquire()
  assert lock.read_holder()["pid"] == os.getpid()
  lock.release()
  assert lock.read_holder() == {}  # released: nobody named


def test_waiting_gets_the_lock_when_the_holder_ends(tmp_path):
  proc = _holder(tmp_path, seconds=1.0)
  start = time.monotonic()
  with workdir_lock.WorkdirLock(str(tmp_path), wait_s=60, poll_s=0.1) as lock:
    assert lock.read_holder()["pid"] == os.getpid()
  assert time.monotonic() - start < 30
  proc.wait()


def test_waiting_is_bounded(tmp_path):
  proc = _holder(tmp_path)
  try:
    start = time.monotonic()
    with pytest.raises(workdir_lock.WorkdirBusyError, match=r"waited 1 s"):
      workdir_lock.WorkdirLock(str(tmp_path), wait_s=1, poll_s=0.1).acquire()
    assert time.monotonic() - start < 10
  finally:
    proc.kill()
    proc.wait()


def test_hold_releases_on_exit_and_on_error(tmp_path):
  with pytest.raises(KeyError):
    with workdir_lock.hold(str(tmp_path), wait_s=0, is_holder=True, process_count=1):
      raise KeyError("boom")
  with workdir_lock.hold(str(tmp_path), wait_s=0, is_holder=True, process_count=1):
    pass
  with workdir_lock.hold(str(tmp_path), wait_s=0, is_holder=False, process_count=1) as lock:
    assert lock.read_holder() == {}  # not process 0: takes nothing


SMOKE = (
  "--config=tests/fixtures/debug_regression.py:smoke",
  "--config.train.steps=40",
  "--config.train.log_every=1",
  "--config.debug.step_delay_s=0.1",
)


@pytest.mark.slow
@pytest.mark.parametrize(
  "second",
  [(), ("--config.train.learning_rate=0.01", "--config.seed=3")],
  ids=["same_config", "other_config"],
)
def test_two_launches_into_one_workdir_run_exactly_one(tmp_path, second):
  workdir = tmp_path / "run"
  first = spawn(*SMOKE, f"--workdir={workdir}", log_path=tmp_path / "first.log")
  deadline = time.time() + 120
  while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.1)
  proc = launch_here(*SMOKE, *second, f"--workdir={workdir}")  # refused before it trains
  assert proc.returncode == 1
  assert f"workdir {workdir} is in use by pid {first.pid}" in proc.stderr, proc.stderr[-2000:]
  assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
  steps = [
    json.loads(line)["step"]
    for line in open(workdir / "metrics.jsonl")
    if "loss" in json.loads(line)
  ]
  assert steps == list(range(1, 41))  # every step logged once: no second writer
  config = json.loads((workdir / "config.json").read_text())
  assert config["seed"] == 0 and config["train"]["learning_rate"] == 0.003


@pytest.mark.slow
def test_a_requeued_launch_waits_for_its_predecessor(tmp_path):
  workdir = tmp_path / "run"
  first = spawn(*SMOKE, f"--workdir={workdir}", log_path=tmp_path / "first.log")
  deadline = time.time() + 120
  while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.1)
  proc = launch(
    *SMOKE, f"--workdir={workdir}", "--wait_for_workdir_s=300", "--config.train.steps=44"
  )
  assert first.wait(timeout=300) == 0
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed at step 40" in proc.stderr
