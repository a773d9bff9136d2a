"""Sweep reports from files alone: means, t intervals and paired differences on known numbers,
the plot, one run's curves, and a clear failure on a folder that holds neither."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from maskax.ablation import report, sweep

# eval/mse per seed 0, 1, 2: hidden=16 is the baseline's value plus 1, 2, 0.
MSE = {8: [1.0, 2.0, 3.0], 16: [2.0, 4.0, 3.0]}
T2 = 4.302653  # t_{0.975, df=2}


def _fake_sweep(root, *, unfinished=()):
  axes, seeds = [("model.hidden", [8, 16])], [0, 1, 2]
  runs = sweep.plan(axes, seeds)
  sweep.write_manifest(
    str(root), axes, seeds, runs, baseline="model.hidden=8", metrics=["eval/mse"]
  )
  for r in runs:
    workdir = root / r.dirname
    workdir.mkdir()
    value = MSE[dict(r.cell)["model.hidden"]][r.seed]
    with open(workdir / "metrics.jsonl", "w") as f:
      for step, v in ((2, 2 * value), (4, value)):
        f.write(json.dumps({"step": step, "time": step / 10, "eval/mse": v}) + "\n")
    if r.dirname not in unfinished:
      sweep.write_final(str(workdir), {"eval/mse": value, "loss": value}, {}, duration_s=1.0)
  return runs


def test_tables_give_mean_std_interval_and_paired_difference(tmp_path):
  _fake_sweep(tmp_path)
  md, csv_path, png = report.write_sweep_report(str(tmp_path))
  with open(csv_path) as f:
    rows = {row["model.hidden"]: row for row in csv.DictReader(f)}
  base, other = rows["8"], rows["16"]
  assert base["metric"] == "eval/mse" and int(base["n"]) == 3
  assert float(base["mean"]) == pytest.approx(2.0) and float(base["std"]) == pytest.approx(1.0)
  assert float(base["ci_low"]) == pytest.approx(2.0 - T2 / math.sqrt(3), abs=1e-6)
  assert float(base["ci_high"]) == pytest.approx(2.0 + T2 / math.sqrt(3), abs=1e-6)
  assert int(base["diff_n"]) == 0 and base["diff_mean"] == "nan"  # the baseline itself
  # 16 - 8 by seed: 1, 2, 0 -> mean 1, std 1, the same half-width as above.
  assert float(other["mean"]) == pytest.approx(3.0)
  assert float(other["diff_mean"]) == pytest.approx(1.0) and int(other["diff_n"]) == 3
  assert float(other["diff_ci_low"]) == pytest.approx(1.0 - T2 / math.sqrt(3), abs=1e-6)
  text = open(md).read()
  assert "| model.hidden | mean | std | n | 95% CI |" in text
  assert "| 8 | 2 | 1 | 3 | [-0.4841, 4.484] | baseline |" in text
  assert "| 16 | 3 | 1 | 3 | [0.5159, 5.484] | +1 | [-1.484, +3.484] | within noise |" in text
  assert "## loss" not in text  # REPORT_METRICS (the manifest's metrics) decide the tables
  assert os.path.getsize(png) > 0


def test_unfinished_runs_are_listed_not_counted(tmp_path):
  _fake_sweep(tmp_path, unfinished=("model.hidden=16,seed=2",))
  md, _, _ = report.write_sweep_report(str(tmp_path))
  text = open(md).read()
  assert "Not counted (no final.json yet): model.hidden=16,seed=2." in text
  # seeds 0, 1 remain: values 2, 4 (mean 3); differences 1, 2 (mean 1.5), df = 1
  assert "| 16 | 3 | 1.414 | 2 |" in text and "| +1.5 |" in text


def test_report_cli_rebuilds_a_sweep_and_draws_one_run(tmp_path, capsys):
  runs = _fake_sweep(tmp_path)
  assert report.main([str(tmp_path)]) == 0
  assert "wrote" in capsys.readouterr().out and (tmp_path / "results.md").exists()
  one = tmp_path / runs[0].dirname
  assert report.main([str(one)]) == 0
  assert (one / "results.png").stat().st_size > 0


def test_a_folder_without_manifest_is_read_from_its_run_folders(tmp_path):
  runs = _fake_sweep(tmp_path)
  os.remove(tmp_path / sweep.MANIFEST_FILE)
  manifest, finals = report.load_sweep(str(tmp_path))
  assert {(r["cell"], r["seed"]) for r in manifest["runs"]} == {(r.cell_name, r.seed) for r in runs}
  assert all(f is not None for f in finals.values())


@pytest.mark.parametrize("make", ["empty", "missing", "foreign"])
def test_report_cli_on_a_folder_with_nothing_to_report_fails_in_one_line(tmp_path, make):
  target = tmp_path / "d"
  if make != "missing":
    target.mkdir()
  if make == "foreign":
    (target / "notes.txt").write_text("hello")
    (target / "sub").mkdir()
  proc = subprocess.run(
    [sys.executable, "-m", "maskax.ablation.report", str(target)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
  assert str(target) in proc.stderr
