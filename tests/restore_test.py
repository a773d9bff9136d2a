"""Restoring a trained run's parameters alone: bitwise, verified, with its config, and clear
errors for a workdir without checkpoints or a missing step."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskax.training import checkpoint as ckpt_lib
from maskax.training import restore, runs, train
from maskax.data import iterators


def _task():
  def make(rng, n):
    x = rng.normal(size=(n, 2)).astype(np.float32)
    return {"x": x, "y": (x @ np.float32([1.5, -2.0]))[:, None]}

  def loss(params, model_state, batch, key, *, train):
    err = jnp.sum((batch["x"] @ params["w"] + params["b"][None, :] - batch["y"]) ** 2)
    count = model_state["seen"] + batch["x"].shape[0]
    return {"mse": (err, jnp.float32(batch["x"].shape[0]))}, {}, {"seen": count}

  init = lambda key: (
    {"w": jax.random.normal(key, (2, 1)), "b": jnp.zeros((1,))},
    {"seen": jnp.zeros((), jnp.float32)},
  )
  return train.Task(
    init=init,
    loss=loss,
    optimizer=optax.adam(0.1),
    train_data=iterators.SyntheticBatches(make, 8, 0),
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  runs.write_config(workdir, {"seed": 0, "train": {"steps": 6}})
  options = train.LoopOptions(steps=6, log_every=3, checkpoint_every=3, keep_checkpoints=5)
  state, _ = train.train(_task(), options, workdir, seed=0)
  return workdir, jax.device_get(state)


def test_the_first_metrics_record_holds_the_startup_phases(trained):
  workdir, _ = trained
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert records[0]["step"] == 3 and records[0]["startup/init_s"] > 0
  assert not any(k.startswith("startup/") for r in records[1:] for k in r)


def test_restores_the_final_parameters_and_model_state_bitwise(trained):
  workdir, state = trained
  got = restore.restore_params(workdir)
  assert got.step == 6 and got.config == {"seed": 0, "train": {"steps": 6}}
  for a, b in zip(
    jax.tree.leaves((got.params, got.model_state)),
    jax.tree.leaves((state.params, state.model_state)),
  ):
    assert isinstance(a, np.ndarray) and np.array_equal(a, b)
  assert float(got.model_state["seen"]) == 6 * 8


def test_restoring_logs_no_warning(trained, caplog):
  restore.restore_params(trained[0])  # orbax warned of a missing step metadata file (issue 18)
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_relative_workdir_is_read(trained, monkeypatch):
  workdir, state = trained
  monkeypatch.chdir(os.path.dirname(workdir))
  got = restore.restore_params(os.path.basename(workdir))  # as from --workdir=runs/x
  assert got.step == 6 and np.array_equal(got.params["w"], state.params["w"])


def test_an_older_step_can_be_chosen(trained):
  workdir, state = trained
  older = restore.restore_params(workdir, step=3)
  assert older.step == 3 and float(older.model_state["seen"]) == 3 * 8
  assert not np.array_equal(older.params["w"], state.params["w"])


def test_the_config_survives_a_deleted_config_json(trained, tmp_path):
  workdir, _ = trained
  import shutil

  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  os.remove(copy / runs.CONFIG_FILE)
  assert restore.restore_params(str(copy)).config["train"] == {"steps": 6}


def test_missing_checkpoint_and_step_are_clear_errors(trained, tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no checkpoint: train it first"):
    restore.restore_params(str(tmp_path))
  with pytest.raises(ValueError, match="no checkpoint at step 4; it has steps 3, 6"):
    restore.restore_params(trained[0], step=4)


def test_damaged_parameters_fail_their_checksum(trained, tmp_path):
  import shutil

  copy = tmp_path / "copy"
  shutil.copytree(trained[0], copy)
  for root, _, files in os.walk(copy / "checkpoints" / "6" / "state"):
    for name in files if os.path.basename(root) == "d" else ():  # every array-data file
      path = os.path.join(root, name)
      data = bytearray(open(path, "rb").read())
      for i in range(0, len(data), 16):
        data[i] ^= 0x01
      open(path, "wb").write(bytes(data))
  with pytest.raises(ckpt_lib.CorruptCheckpointError):
    restore.restore_params(str(copy))
  assert json.loads((copy / runs.CONFIG_FILE).read_text())["seed"] == 0  # nothing rewritten
