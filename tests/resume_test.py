"""Resume bookkeeping that a kill cannot break: every kept checkpoint verifies, a torn metrics
line is repaired, and the config a resume is checked against travels inside each checkpoint."""

import os
import signal
import time

import pytest

from conftest import SMOKE20, launch, launch_here, read_losses, spawn
from maskax.training import checkpoint as ckpt_lib
from maskax.training import progress, runs

SMOKE = "--config=tests/fixtures/debug_regression.py:smoke"  # the template + test-only hooks


def test_a_torn_last_metrics_line_is_dropped_and_repaired(tmp_path, caplog):
  path = tmp_path / progress.METRICS_FILE
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
  with caplog.at_level("WARNING"):
    assert progress.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
  assert "dropped a torn last line" in caplog.text
  writer = progress.MetricWriter(str(tmp_path), resume_step=2)
  writer.write(3, {"loss": 0.3}, elapsed=1.0)
  assert [r["step"] for r in progress.read_metrics(tmp_path)] == [1, 2, 3]
  assert path.read_text().endswith("\n") and path.read_text().count("\n") == 3


def test_a_last_line_without_its_newline_is_kept_and_ended(tmp_path):
  path = tmp_path / progress.METRICS_FILE
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}')
  progress.MetricWriter(str(tmp_path), resume_step=2).write(3, {"loss": 0.3}, elapsed=1.0)
  assert [r["step"] for r in progress.read_metrics(tmp_path)] == [1, 2, 3]


def test_a_bad_line_in_the_middle_names_the_file_and_line(tmp_path):
  (tmp_path / progress.METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not valid JSON"):
    progress.read_metrics(tmp_path)


@pytest.mark.parametrize(
  "key, value, expected",
  [
    ("train.learning_rate", float("nan"), "train.learning_rate=nan must be a finite number > 0"),
    ("train.learning_rate", float("inf"), "train.learning_rate=inf must be"),
    ("train.learning_rate", 0.0, "train.learning_rate=0.0 must be"),
    ("train.steps", -3, "train.steps=-3 must be an integer"),
    ("train.batch_size", 0, "train.batch_size=0 must be a positive integer"),
    ("train.warmup_steps", -1, "train.warmup_steps=-1 must be an integer >= 0"),
  ],
)
def test_values_no_run_can_use_are_refused_naming_the_key(key, value, expected):
  config = {"train": {"learning_rate": 1e-3, "steps": 10, "batch_size": 8, "warmup_steps": 2}}
  runs.check_values(config)
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(ValueError) as error:
    runs.check_values(config)
  assert str(error.value).startswith(expected) and f"--config.{key}=" in str(error.value)


def test_char_rnn_batch_chars_stands_in_for_batch_size():
  runs.check_values({"train": {"batch_size": 0, "batch_chars": 3200}})


@pytest.mark.slow
def test_config_json_deleted_then_a_changed_config_is_refused_with_a_diff(tmp_path):
  workdir = tmp_path / "w"
  launch_here(SMOKE, f"--workdir={workdir}", check=True)
  os.remove(workdir / runs.CONFIG_FILE)
  proc = launch_here(
    SMOKE, f"--workdir={workdir}", "--config.seed=3", "--config.train.learning_rate=0.01"
  )
  assert proc.returncode == 1
  assert "(the config saved in checkpoint 6)" in proc.stderr, proc.stderr[-2000:]
  assert "  seed: 0 -> 3" in proc.stderr and "train.learning_rate: 0.003 -> 0.01" in proc.stderr
  # The unchanged config resumes (the finished run reports its training loss again).
  proc = launch_here(SMOKE, f"--workdir={workdir}", check=True)
  assert "  loss: " in proc.stdout and "  eval/mse: " in proc.stdout, proc.stdout
  assert "could not be restored" not in proc.stderr  # orbax's per-item warnings on resume


def _verify_every_kept_checkpoint(workdir) -> list[int]:
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), every=1, keep=100)
  steps = checkpointer.all_steps()
  for step in steps:  # each one, not only the newest: the loop item must match its checksum
    assert checkpointer.read_loop(step)["config"]["train"]["checkpoint_every"] == 1
  checkpointer.close()
  return steps


EVERY_STEP = (*SMOKE20, "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=30")


@pytest.mark.slow
def test_saving_every_step_while_the_loop_runs_keeps_every_checkpoint_intact(tmp_path):
  # char_rnn's loop is quick enough that, before saves took snapshots, 14 of these 60
  # checkpoints had a loop item that no longer matched its checksum.
  workdir = tmp_path / "run"
  launch(
    "--config=experiments/char_rnn.py:smoke",
    "--config.train.steps=60",
    "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=100",
    "--config.train.log_every=5",
    f"--workdir={workdir}",
    check=True,
  )
  assert _verify_every_kept_checkpoint(workdir) == list(range(1, 61))


@pytest.mark.slow
def test_saving_every_step_then_a_kill_resumes_bitwise(tmp_path, reference_losses):
  workdir = tmp_path / "run"
  proc = spawn(
    *EVERY_STEP,
    f"--workdir={workdir}",
    "--config.debug.step_delay_s=0.15",
    log_path=tmp_path / "first.log",
    devices=2,
  )
  deadline = time.time() + 240
  while (
    time.time() < deadline
    and proc.poll() is None
    and not ((workdir / "metrics.jsonl").exists() and len(read_losses(workdir)) >= 12)
  ):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = _verify_every_kept_checkpoint(workdir)
  assert len(steps) >= 8 and max(steps) < 20, steps
  launch(*EVERY_STEP, f"--workdir={workdir}", devices=2, check=True)
  assert read_losses(workdir) == reference_losses
  assert not [n for n in os.listdir(workdir / "checkpoints") if "corrupt" in n]
