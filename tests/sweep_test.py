"""The sweep grid: axes x seeds, folder names, the baseline cell, and what counts as finished."""

import json
import os

import pytest

from maskax.ablation import sweep

CONFIG = {
  "seed": 0,
  "model.hidden": 16,
  "loss.mode": "token_mean",
  "train.learning_rate": 3e-3,
  "data.shuffle": True,
}


def test_grid_is_the_cartesian_product_repeated_over_seeds():
  axes, seeds = sweep.parse_grid(
    ["model.hidden=8,16", "loss.mode=token_mean,sequence_mean"], CONFIG, seeds=3
  )
  assert axes == [("model.hidden", [8, 16]), ("loss.mode", ["token_mean", "sequence_mean"])]
  assert seeds == [0, 1, 2]
  runs = sweep.plan(axes, seeds)
  assert len(runs) == 12 and len({r.dirname for r in runs}) == 12
  # Seed by seed: every cell at seed 0 before any repeats.
  assert [r.seed for r in runs] == [0] * 4 + [1] * 4 + [2] * 4
  assert {r.cell_name for r in runs[:4]} == {r.cell_name for r in runs[4:8]}
  assert runs[5].dirname == "model.hidden=8,loss.mode=sequence_mean,seed=1"
  assert runs[5].overrides() == {"model.hidden": 8, "loss.mode": "sequence_mean", "seed": 1}
  assert runs[5].cell_name == "model.hidden=8,loss.mode=sequence_mean"


def test_seed_sweep_is_the_same_as_seeds_and_values_are_typed():
  assert (
    sweep.parse_grid(["seed=0,1,2"], CONFIG)
    == sweep.parse_grid([], CONFIG, seeds=3)
    == ([], [0, 1, 2])
  )
  axes, _ = sweep.parse_grid(["train.learning_rate=1e-3,0.01", "data.shuffle=false"], CONFIG)
  assert axes == [("train.learning_rate", [0.001, 0.01]), ("data.shuffle", [False])]
  runs = sweep.plan([], [0, 1])
  assert [r.dirname for r in runs] == ["seed=0", "seed=1"] and runs[0].cell_name == "all"
  # Without a seed sweep, folders are named by the cell alone (config.seed applies).
  assert [r.dirname for r in sweep.plan([("model.hidden", [8])], None)] == ["model.hidden=8"]


@pytest.mark.parametrize(
  "specs, seeds, message",
  [
    (["model.hidden=8,16", "model.hidden=32"], 0, "swept twice"),
    (["seed=0,1"], 2, "--seeds and --sweep=seed"),
    (["hidden=8"], 0, "unknown config key 'hidden'. Did you mean model.hidden"),
    (["model.hidden=8,x"], 0, "'x' is not a valid int for 'model.hidden'"),
    (["model.hidden=8,8"], 0, "repeated"),
    (["model.hidden"], 0, "expected KEY=V1,V2"),
  ],
)
def test_bad_grids_fail_naming_the_problem(specs, seeds, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid(specs, CONFIG, seeds=seeds)


def test_baseline_names_one_cell():
  axes, seeds = sweep.parse_grid(
    ["model.hidden=8,16", "loss.mode=token_mean,sequence_mean"], CONFIG, seeds=2
  )
  runs = sweep.plan(axes, seeds)
  assert sweep.find_cell(None, runs, CONFIG) == "model.hidden=8,loss.mode=token_mean"
  assert (
    sweep.find_cell("model.hidden=16,loss.mode=sequence_mean", runs, CONFIG)
    == "model.hidden=16,loss.mode=sequence_mean"
  )
  with pytest.raises(ValueError, match="2 cells of the sweep match"):
    sweep.find_cell("model.hidden=16", runs, CONFIG)
  with pytest.raises(ValueError, match="no cell of the sweep matches|no cell"):
    sweep.find_cell("model.hidden=32,loss.mode=token_mean", runs, CONFIG)


def test_a_run_is_finished_with_its_final_json_config_and_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = {"seed": 1, "model": {"hidden": 8}, "data": {"pad": float("nan")}}
  assert not sweep.is_finished(workdir, config)
  os.makedirs(tmp_path / "checkpoints" / "6")
  sweep.write_final(workdir, {"eval/mse": 0.25}, config, duration_s=1.5)
  final = json.loads((tmp_path / "final.json").read_text())
  assert final["step"] == 6 and final["metrics"] == {"eval/mse": 0.25}
  assert sweep.is_finished(workdir, config)  # NaN in the config compares equal by text
  assert not sweep.is_finished(workdir, {**config, "seed": 2})  # another config: train it
  os.rmdir(tmp_path / "checkpoints" / "6")
  assert not sweep.is_finished(workdir, config)  # its checkpoint is gone: not trusted
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
