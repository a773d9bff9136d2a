"""launch.py as a user runs it: bad input fails clearly, runs resume exactly, sweeps report."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, _env, launch, launch_here
from maskax.training import progress

SMOKE = "--config=tests/fixtures/debug_regression.py:smoke"  # the template + test-only hooks


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize(
  "args, expected",
  [
    (["--config=experiments/nope.py"], "unknown experiment 'experiments/nope.py'"),
    ([SMOKE.replace(":smoke", ":huge")], "no preset 'huge'. Presets: default, smoke"),
    ([SMOKE, "--config.train.stepz=3"], "stepz"),
    ([SMOKE, "--config.train.steps=many"], "steps"),
    ([SMOKE, "--sweep=train.nope=1,2"], "unknown config key 'train.nope'"),
    ([SMOKE, "--config.train.learning_rate=nan"], "train.learning_rate=nan must be a finite"),
    (
      ["--config=experiments/char_rnn.py:smoke", "--config.train.steps=-3"],
      "train.steps=-3 must be an integer",
    ),
    (
      ["--config=experiments/char_rnn.py:smoke", "--config.train.batch_size=0"],
      "train.batch_size=0 must be a positive integer",
    ),
  ],
)
def test_bad_input_exits_nonzero_naming_the_problem(args, expected, tmp_path):
  proc = launch_here(*args, f"--workdir={tmp_path}/w")
  assert proc.returncode != 0
  assert expected in proc.stderr + proc.stdout, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
  "args, expected",
  [
    # the bad value sits in the grid's last cell: 2 x 2 cells x 2 seeds, the last of 8 runs
    (
      ["--sweep=model.hidden=8,16", "--sweep=train.learning_rate=0.01,-1", "--seeds=2"],
      "train.learning_rate=-1.0 must be a finite number > 0",
    ),
    (["--sweep=model.hidden=8,16", "--baseline=model.hidden=32"], "--baseline=model.hidden=32"),
    (["--sweep=model.hidden=8", "--sweep=model.hidden=16"], "'model.hidden' is swept twice"),
  ],
)
def test_every_sweep_run_is_checked_before_the_first_trains(args, expected, tmp_path):
  proc = launch_here(SMOKE, f"--workdir={tmp_path}/w", *args)
  assert proc.returncode == 1
  assert expected in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")  # not even the valid first run started


@pytest.mark.slow
def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  proc = launch_here(SMOKE, f"--workdir={blocker}/run")
  assert proc.returncode == 1
  assert "cannot write to workdir" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_list_names_every_experiment_with_presets(tmp_path):
  proc = launch_here("--list", check=True, cwd=tmp_path)  # found beside launch.py, from anywhere
  assert "example_regression:" in proc.stdout and ":smoke" in proc.stdout
  assert "common:" not in proc.stdout  # shared defaults, no get_config: not an experiment


@pytest.mark.slow
def test_config_paths_resolve_from_the_cwd_then_the_repository(tmp_path):
  # From another directory, experiments/... is found under the repository root: the run gets
  # as far as checking the override's key.
  proc = launch_here(SMOKE, "--config.train.stepz=3", cwd=tmp_path)
  assert proc.returncode == 1 and "unknown config key 'train.stepz'" in proc.stderr
  proc = launch_here("--config=elsewhere/nope.py", cwd=tmp_path)
  assert proc.returncode == 1 and "unknown experiment 'elsewhere/nope.py'" in proc.stderr
  assert "experiments/example_regression.py" in proc.stderr


@pytest.mark.slow
def test_any_config_file_runs_from_any_directory(tmp_path):
  # A copy outside the repository still imports `experiments.common` (the root is on sys.path).
  shutil.copy(os.path.join(ROOT, "experiments", "example_regression.py"), tmp_path / "mine.py")
  launch_here("--config=mine.py:smoke", "--workdir=run", check=True, cwd=tmp_path)
  run = tmp_path / "run"
  assert (run / "final.json").exists() and (run / "checkpoints" / "6").is_dir()
  assert [r["step"] for r in progress.read_metrics(run) if "loss" in r] == [2, 4, 6]
  assert list(run.glob("events.out.tfevents.*"))  # TensorBoard files beside metrics.jsonl


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_bitwise(tmp_path):
  common = [
    SMOKE,
    "--config.train.steps=12",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
  ]
  clean = tmp_path / "clean"
  launch(*common, f"--workdir={clean}", check=True)
  assert os.path.isdir(clean / "checkpoints" / "12"), "final checkpoint missing after return"

  killed = tmp_path / "killed"
  env = _env(1)  # the compiler flags of the clean run: a different XLA build of the step
  # computes different bits, which is no resume defect
  proc = subprocess.Popen(
    [
      sys.executable,
      "launch.py",
      *common,
      f"--workdir={killed}",
      "--config.debug.step_delay_s=0.3",
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 120
  while not os.path.isdir(killed / "checkpoints" / "6") and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.isdir(killed / "checkpoints" / "12"), "the run finished before the kill"
  launch(*common, f"--workdir={killed}", "--config.debug.step_delay_s=0.3", check=True)
  assert _losses(killed) == _losses(clean)  # bitwise: floats parsed from the same repr
  assert len(_losses(clean)) == 12


@pytest.mark.slow
def test_resume_with_changed_numerics_stops_with_a_diff(tmp_path):
  work = f"--workdir={tmp_path}/w"
  launch_here(SMOKE, work, check=True)
  proc = launch_here(SMOKE, work, "--config.train.learning_rate=0.1")
  assert proc.returncode == 1
  assert "train.learning_rate: 0.003 -> 0.1" in proc.stderr
  # Extending a run is not a change of numerics.
  launch_here(SMOKE, work, "--config.train.steps=8", check=True)


@pytest.mark.slow
def test_nonfinite_step_stops_naming_the_step(tmp_path):
  proc = launch_here(SMOKE, f"--workdir={tmp_path}/w", "--config.debug.inject_nonfinite_at_step=3")
  assert proc.returncode == 1
  assert "non-finite loss, gradient or update at step(s) [3]" in proc.stderr
  proc = launch_here(
    SMOKE,
    f"--workdir={tmp_path}/skip",
    "--config.debug.inject_nonfinite_at_step=3",
    "--config.train.on_nonfinite=skip",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "step 3: non-finite loss, gradient or update; the update was skipped" in proc.stderr


@pytest.mark.slow
def test_a_half_finished_sweep_resumes_and_skips_finished_runs(tmp_path):
  sweep_args = [SMOKE, f"--workdir={tmp_path}", "--sweep=model.hidden=8,16", "--seeds=2"]
  proc = launch_here(*sweep_args, check=True)
  assert "sweep run 1/4 (model.hidden=8, seed=0), ETA ?" in proc.stderr
  assert "sweep run 4/4 (model.hidden=16, seed=1), ETA " in proc.stderr
  for name in ("results.md", "results.csv", "results.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  table = (tmp_path / "results.md").read_text()
  assert "| model.hidden | mean | std | n | 95% CI |" in table and "## eval/mse" in table
  assert "| 8 | " in table and "| 16 | " in table and "| 2 | [" in table  # n = 2 seeds
  assert "results.md" in proc.stdout

  # Half-finished: the last run lost its final checkpoint and final.json, as when a sweep is
  # killed during that run's last steps.
  partial = tmp_path / "model.hidden=16,seed=1"
  shutil.rmtree(partial / "checkpoints" / "6")
  os.remove(partial / "final.json")
  finished = [p for p in tmp_path.glob("model.hidden=*") if p != partial]
  before = {p: ((p / "metrics.jsonl").read_bytes(), sorted(os.listdir(p))) for p in finished}
  proc = launch_here(*sweep_args, check=True)
  assert "sweep: 3 of 4 runs already finished" in proc.stderr
  assert "sweep run 4/4 (model.hidden=16, seed=1)" in proc.stderr
  assert "sweep run 1/4" not in proc.stderr
  assert "resumed at step 4" in proc.stderr
  assert {
    p: ((p / "metrics.jsonl").read_bytes(), sorted(os.listdir(p))) for p in finished
  } == before  # not run again: no line, no event file, nothing
  assert (partial / "final.json").exists()
  assert [r["step"] for r in progress.read_metrics(partial) if "loss" in r] == [2, 4, 6]


def test_freed_topology_resumes_on_another_process_count_and_says_so(tmp_path, caplog):
  from maskax.training import runs

  workdir = str(tmp_path)
  config = {"train": {"learning_rate": 0.1, "steps": 5}}
  runs.write_config(workdir, config, topology={"process_count": 2, "device_count": 2})
  os.makedirs(tmp_path / "checkpoints" / "5")
  one = {"process_count": 1, "device_count": 1}
  with caplog.at_level("WARNING"):
    runs.write_config(
      workdir, config, topology=one, free_topology=("process_count", "device_count")
    )
  assert "device_count 2 -> 1, process_count 2 -> 1" in caplog.text
  assert json.loads((tmp_path / "topology.json").read_text()) == one
  with pytest.raises(runs.ConfigChangedError, match="topology.device_count: 1 -> 4"):
    runs.write_config(
      workdir, config, topology={"process_count": 1, "device_count": 4}, free_topology=()
    )


def test_topology_is_pinned_on_resume_unless_allowed(tmp_path):
  from maskax.training import runs

  workdir = str(tmp_path)
  config = {"train": {"learning_rate": 0.1, "steps": 5}}
  one = {"process_count": 1, "device_count": 1, "data_workers": 1}
  runs.write_config(workdir, config, topology=one)
  os.makedirs(tmp_path / "checkpoints" / "5")
  two = {"process_count": 2, "device_count": 2, "data_workers": 2}
  with pytest.raises(runs.ConfigChangedError) as error:
    runs.write_config(workdir, {"train": {"learning_rate": 0.2, "steps": 9}}, topology=two)
  lines = str(error.value).splitlines()
  assert "  train.learning_rate: 0.1 -> 0.2" in lines
  assert "  topology.process_count: 1 -> 2" in lines
  assert "  topology.device_count: 1 -> 2" in lines
  assert not any("train.steps" in line for line in lines)  # a safe key
  runs.write_config(workdir, config, topology=two, allow_change=True)
  assert json.loads((tmp_path / "topology.json").read_text()) == two
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # atomic writes leave no debris
