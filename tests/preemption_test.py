"""One process stopped by SIGTERM or SIGKILL resumes with bitwise the losses of a clean run."""

import os
import signal
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import SMOKE20, launch, read_losses, spawn
from maskax.training import preemption, progress, train
from maskax.data import iterators

SLOW = "--config.debug.step_delay_s=0.3"

# Holds the commit (the rename of the tmp folder) of one step's async save for a minute, so the
# test can SIGKILL the process while that save is in flight: slow storage, made deterministic.
HOLD_COMMIT = """
import asyncio, os, runpy, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def held_finalize(self):
  if self.get_final().name == os.environ["HOLD_STEP"]:
    open(os.environ["HOLD_MARKER"], "w").close()
    await asyncio.sleep(60)
  return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = held_finalize
sys.argv = ["launch.py"] + sys.argv[1:]
runpy.run_path("launch.py", run_name="__main__")
"""


def _wait_for(condition, proc, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early with status {proc.returncode}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_recomputes_nothing(tmp_path, reference_losses):
  workdir = tmp_path / "run"
  proc = spawn(*SMOKE20, f"--workdir={workdir}", SLOW, log_path=tmp_path / "first.log", devices=2)
  _wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(read_losses(workdir)) >= 7, proc)
  proc.send_signal(signal.SIGTERM)
  sent = time.time()
  assert proc.wait(timeout=30) == 0, (tmp_path / "first.log").read_text()[-3000:]
  assert time.time() - sent < 5
  logged = read_losses(workdir)
  stopped = max(logged)
  assert f"stopped at step {stopped} " in (tmp_path / "first.log").read_text()
  assert stopped < 20 and os.path.isdir(workdir / "checkpoints" / str(stopped))

  proc = launch(*SMOKE20, f"--workdir={workdir}", devices=2, check=True)
  assert f"resumed at step {stopped} " in proc.stderr  # the last logged step: nothing redone
  assert read_losses(workdir) == reference_losses


@pytest.mark.slow
def test_sigkill_during_async_save_resumes_from_the_previous_commit(tmp_path, reference_losses):
  workdir, marker = tmp_path / "run", tmp_path / "holding"
  env = {"HOLD_STEP": "10", "HOLD_MARKER": str(marker)}
  proc = spawn(
    *SMOKE20,
    f"--workdir={workdir}",
    SLOW,
    log_path=tmp_path / "first.log",
    devices=2,
    env=env,
    python_args=("-c", HOLD_COMMIT),
  )
  _wait_for(marker.exists, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  names = os.listdir(workdir / "checkpoints")
  assert "5" in names and "10" not in names, names
  assert any(n.startswith("10.") for n in names), names  # the save was in flight

  proc = launch(*SMOKE20, f"--workdir={workdir}", devices=2, check=True)
  assert "resumed at step 5 " in proc.stderr
  assert read_losses(workdir) == reference_losses


def test_stop_signal_sets_its_flag_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignal() as stop:
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not stop.requested() and time.time() < deadline:
      time.sleep(0.01)
    assert stop.requested()
  assert signal.getsignal(signal.SIGTERM) is before


def _tiny_task(signal_at: int = -1):
  """A 2-parameter regression whose data pipeline sends SIGTERM to this process at batch
  `signal_at` (as a scheduler would, from outside)."""

  def make(rng, n):
    x = rng.normal(size=(n, 2)).astype(np.float32)
    return {"x": x, "y": (x @ np.float32([1.5, -2.0]))[:, None]}

  class Signalling(iterators.SyntheticBatches):
    def __next__(self):
      if self.position == signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return super().__next__()

  def loss(params, model_state, batch, key, *, train):
    err = jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2)
    return {"mse": (err, jnp.float32(batch["x"].shape[0]))}, {}, model_state

  return train.Task(
    init=lambda key: ({"w": jnp.zeros((2, 1))}, {}),
    loss=loss,
    optimizer=optax.sgd(0.1),
    train_data=Signalling(make, 8, 0),
  )


def test_in_process_preemption_resumes_with_identical_metrics(tmp_path):
  options = train.LoopOptions(steps=9, log_every=3, checkpoint_every=100)
  with pytest.raises(train.Preempted) as stopped:
    train.train(_tiny_task(signal_at=3), options, str(tmp_path / "run"), seed=0)
  step = stopped.value.step
  assert step == 5  # mid log interval: its partial sums must carry over
  assert os.listdir(tmp_path / "run" / "checkpoints") == [str(step)]
  train.train(_tiny_task(), options, str(tmp_path / "run"), seed=0)
  train.train(_tiny_task(), options, str(tmp_path / "clean"), seed=0)
  timing = lambda k: k in ("time", "steps_per_s") or k.startswith("startup/")
  strip = lambda records: [{k: v for k, v in r.items() if not timing(k)} for r in records]
  assert strip(progress.read_metrics(tmp_path / "run")) == strip(
    progress.read_metrics(tmp_path / "clean")
  )
