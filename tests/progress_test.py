"""TensorBoard event files beside metrics.jsonl, and a speed that leaves compilation and
evaluation out."""

import glob
import math
import os
import struct
import time

import pytest
from jax import monitoring
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from maskax.training import progress


def read_events(path):
  """Every Event of one event file, checking the TFRecord framing and both CRCs as
  TensorBoard's reader does (a bad CRC there drops the rest of the file)."""
  with open(path, "rb") as f:
    data = f.read()
  events, i = [], 0
  while i < len(data):
    header = data[i : i + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(header)
    body = data[i + 12 : i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length : i + 16 + length])[0] == masked_crc32c(body)
    events.append(event_pb2.Event.FromString(body))
    i += 16 + length
  return events


def visible_scalars(workdir):
  """`[(tag, step, value)]` as TensorBoard shows them: files in name order, every point kept
  (a step logged twice is drawn twice), except that a SessionLog START at step p drops what
  came before it at steps >= p (the purge rule of tensorboard's EventAccumulator)."""
  shown = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in read_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = [point for point in shown if point[1] < event.step]
      shown += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
  return shown


def test_metrics_are_written_as_tensorboard_scalars(tmp_path):
  writer = progress.MetricWriter(str(tmp_path))
  writer.write(2, {"loss": 0.5, "steps_per_s": 10.0}, elapsed=0.1)
  writer.write(4, {"eval/mse": 0.25}, elapsed=0.2)
  # Readable while the run goes on: every write is flushed, nothing waits for close().
  assert visible_scalars(tmp_path) == [
    ("loss", 2, 0.5),
    ("steps_per_s", 2, 10.0),
    ("eval/mse", 4, 0.25),
  ]
  writer.close()
  assert [r["step"] for r in progress.read_metrics(tmp_path)] == [2, 4]


def test_a_resume_hides_the_steps_logged_after_the_checkpoint(tmp_path):
  killed = progress.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    killed.write(step, {"loss": float(step)}, elapsed=step)
  # killed after step 3, resumed from the checkpoint at step 2: step 3 is trained again.
  resumed = progress.MetricWriter(str(tmp_path), resume_step=2)
  resumed.write(3, {"loss": 30.0}, elapsed=3)
  resumed.write(4, {"loss": 40.0}, elapsed=4)
  assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2  # none overwritten
  assert visible_scalars(tmp_path) == [
    ("loss", 1, 1.0),
    ("loss", 2, 2.0),
    ("loss", 3, 30.0),
    ("loss", 4, 40.0),
  ]
  assert [r["loss"] for r in progress.read_metrics(tmp_path)] == [1.0, 2.0, 30.0, 40.0]


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def compile_for(seconds):
  monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", seconds)


def test_speed_and_eta_leave_out_compilation_and_evaluation():
  clock = FakeClock()
  p = progress.Progress(100, 0, clock=clock)
  clock.now += 3.0
  compile_for(2.0)  # the first step's compilation: 2 of the window's 3 seconds
  assert p.rate(10) == pytest.approx(10.0)  # 10 steps in 1 s of training
  assert "ETA 0:09" in p.line(10, {"loss": 1.0}, p.rate(10))  # 90 steps at 10/s
  clock.now += 2.0
  assert p.rate(30) == pytest.approx(30 / 3.0)  # mean over the run: 30 steps in 3 s
  # An evaluation after the log step: its window trains no step and counts for nothing.
  clock.now += 50.0
  p.log(30, {"eval/mse": 0.1}, None)
  assert p.rate(30) == pytest.approx(10.0)
  # A window that holds training and an evaluation (eval_every not a multiple of log_every)
  # is left out whole: its split is unknown.
  clock.now += 20.0
  p.log(35, {"eval/mse": 0.1}, None)
  assert p.rate(35) == pytest.approx(10.0)
  clock.now += 1.0
  assert p.rate(40) == pytest.approx(35 / 4.0)


def test_speed_is_unknown_until_a_window_counts():
  clock = FakeClock()
  p = progress.Progress(10, 4, clock=clock)  # resumed at step 4
  clock.now += 1.0
  p.log(4, {"eval/mse": 0.1}, None)
  assert math.isnan(p.rate(4))
  assert p.line(4, {"loss": 1.0}, p.rate(4)).endswith("? steps/s  ETA ?")


def test_startup_phases_are_timed_logged_and_cleared(caplog):
  progress.phases(clear=True)
  with caplog.at_level("INFO"):
    with progress.phase("data"):
      time.sleep(0.05)
    with progress.phase("data"):  # a phase entered twice adds up
      time.sleep(0.05)
    with pytest.raises(RuntimeError):
      with progress.phase("tokenizer"):  # timed even when it fails: the log says how far it got
        raise RuntimeError("boom")
  got = progress.phases(clear=True)
  assert set(got) == {"data", "tokenizer"} and 0.1 <= got["data"] < 5
  assert progress.phases() == {}
  assert "start-up: data took" in caplog.text and "start-up: tokenizer took" in caplog.text
