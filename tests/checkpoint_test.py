"""Checkpoints are verified before use: a damaged newest one falls back, none intact fails."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maskax.training import checkpoint as ckpt_lib
from maskax.training import integrity


def _state(step):
  w = np.random.default_rng(step).normal(size=(1024,)).astype(np.float32)
  return {
    "w": jnp.asarray(w),
    "b": jnp.full((3,), step, jnp.int32),
    "key": jax.random.key_data(jax.random.key(step)),
  }


def _saved(tmp_path, steps=(2, 4)):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=2, keep=3)
  for step in steps:
    checkpointer.save(step, _state(step), {"position": step}, {"elapsed": float(step)})
  checkpointer.close()
  return tmp_path / "ckpt"


def _reopen(directory):
  return ckpt_lib.Checkpointer(str(directory), every=2, keep=3)


def _quick_retries(directory):
  return ckpt_lib.Checkpointer(str(directory), every=2, keep=3, read_backoff_s=(0.05,))


def _abstract():
  return ckpt_lib.abstract_like(_state(0))


def _array_file(step_dir):
  """The largest array-data file of the state item (ocdbt keeps array bytes under `d/`)."""
  files = [
    os.path.join(r, f)
    for r, _, fs in os.walk(step_dir / "state")
    for f in fs
    if os.path.basename(r) == "d"
  ]
  return max(files, key=os.path.getsize)


def _flip_byte(step_dir):
  path = _array_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


def _truncate(step_dir):
  path = _array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _empty(step_dir):
  for root, dirs, files in os.walk(step_dir, topdown=False):
    for f in files:
      os.remove(os.path.join(root, f))
    for d in dirs:
      os.rmdir(os.path.join(root, d))


def _half_copied(step_dir):
  os.remove(_array_file(step_dir))


def _no_integrity_record(step_dir):
  for f in os.listdir(step_dir / "integrity"):
    os.remove(step_dir / "integrity" / f)
  os.rmdir(step_dir / "integrity")


def _edited_data_position(step_dir):
  path = step_dir / "data" / "metadata"
  path.write_text(path.read_text().replace("4", "5"))


def test_intact_checkpoint_restores_bitwise(tmp_path):
  directory = _saved(tmp_path)
  state, data, loop = _reopen(directory).restore_latest(_abstract())
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(4))):
    assert np.array_equal(a, b)
  assert data == {"position": 4} and loop == {"elapsed": 4.0}


def test_a_flipped_byte_is_restored_silently_without_checksums(tmp_path):
  # Why the integrity item exists: orbax itself returns the altered array.
  directory = _saved(tmp_path)
  _flip_byte(directory / "4")
  raw = ocp.StandardCheckpointer().restore(directory / "4" / "state")
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(jax.device_get(_state(4))))
  )


# A failed tensorstore read leaves an un-awaited orbax coroutine behind; that is orbax's noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "damage",
  [_flip_byte, _truncate, _empty, _half_copied, _no_integrity_record, _edited_data_position],
)
def test_damaged_latest_falls_back_with_a_warning(tmp_path, damage, caplog):
  directory = _saved(tmp_path)
  damage(directory / "4")
  checkpointer = _reopen(directory)
  with caplog.at_level(logging.WARNING):
    state, data, _ = checkpointer.restore_latest(_abstract())
  assert data == {"position": 2}
  assert np.array_equal(state["w"], _state(2)["w"])
  assert "checkpoint at step 4 is unusable" in caplog.text
  # Set aside, so that step 4 can be saved again and orbax no longer lists it.
  assert checkpointer.all_steps() == [2]
  assert any(n.startswith("4.corrupt-") for n in os.listdir(directory))
  assert checkpointer.save(4, _state(4), {"position": 4}, {"elapsed": 4.0})
  checkpointer.close()
  assert _reopen(directory).restore_latest(_abstract())[1] == {"position": 4}


def test_no_intact_checkpoint_is_a_clear_error_and_renames_nothing(tmp_path):
  directory = _saved(tmp_path)
  _flip_byte(directory / "4")
  _empty(directory / "2")
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as error:
    _reopen(directory).restore_latest(_abstract())
  message = str(error.value)
  assert "no intact checkpoint" in message and "step 4:" in message and "step 2:" in message
  assert "does not match its checksums: w" in message.replace("state/", "")
  assert sorted(os.listdir(directory)) == ["2", "4"]


def test_agree_makes_every_process_fall_back_together(tmp_path):
  directory = _saved(tmp_path)
  votes = []

  def agree(flag):  # per step: a read-error vote, then a damage vote
    votes.append(flag)
    return True if len(votes) == 2 else flag  # another process found step 4 damaged

  restored = _reopen(directory).restore_latest(_abstract(), agree=agree)
  assert votes == [False, False, False, False]
  assert restored[1] == {"position": 2}


def test_agree_makes_every_process_stop_on_another_process_read_error(tmp_path):
  directory = _saved(tmp_path)
  checkpointer = _quick_retries(directory)
  with pytest.raises(ckpt_lib.CheckpointReadError, match="another process could not read it"):
    checkpointer.restore_latest(_abstract(), agree=lambda flag: True)
  assert sorted(os.listdir(directory)) == ["2", "4"]


def test_empty_workdir_restores_nothing(tmp_path):
  assert _reopen(tmp_path / "none").restore_latest(_abstract()) is None


def test_digest_covers_dtype_shape_and_bytes():
  x = np.arange(6, dtype=np.float32)
  assert integrity.array_digest(x) == integrity.array_digest(x.copy())
  assert integrity.array_digest(x) != integrity.array_digest(x.reshape(2, 3))
  assert integrity.array_digest(x) != integrity.array_digest(x.astype(np.int32))
  y = x.copy()
  y[3] = np.nextafter(y[3], np.float32(9))
  assert integrity.array_digest(x) != integrity.array_digest(y)
  assert integrity.array_digest(jax.random.key(0)) == integrity.array_digest(jax.random.key(0))
  assert integrity.array_digest(np.float32(1)) != integrity.array_digest(np.ones((1,), np.float32))


def test_checkpoint_saved_before_checksums_restores_unverified(tmp_path, caplog):
  old = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("state", "data", "loop"))
  old.save(
    2,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(2)),
      data=ocp.args.JsonSave({"position": 2}),
      loop=ocp.args.JsonSave({"elapsed": 2.0}),
    ),
  )
  old.wait_until_finished()
  old.close()
  with caplog.at_level(logging.WARNING):
    state, data, _ = _reopen(tmp_path / "ckpt").restore_latest(_abstract())
  assert data == {"position": 2} and np.array_equal(state["w"], _state(2)["w"])
  assert "before maskax stored checksums" in caplog.text


def test_json_items_are_snapshots_while_the_loop_goes_on(tmp_path):
  # The loop mutates its dicts right after `save` returns, while orbax writes them in the
  # background; every kept checkpoint must still match its checksums.
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=100)
  loop = {"elapsed": 0.0, "nonfinite_steps": [], "log_sums": {"loss": [[0.0, "float32"]]}}
  data = {"position": 0, "order": [0]}
  for step in range(1, 31):
    loop["elapsed"] = float(step)
    data["position"] = step
    checkpointer.save(step, _state(step), data, loop)
    loop["elapsed"] += 0.5  # what train.py did: mutate after handing the dicts over
    loop["nonfinite_steps"].append(step)
    loop["log_sums"]["loss"][0][0] = float(step) * 7
    data["order"].append(step)
  checkpointer.close()
  reopened = _reopen(tmp_path / "ckpt")
  assert reopened.all_steps() == list(range(1, 31))
  for step in reopened.all_steps():
    _, data_saved, loop_saved = reopened.restore(_abstract(), step)
    assert loop_saved["elapsed"] == float(step) and data_saved["position"] == step
    assert loop_saved["nonfinite_steps"] == list(range(1, step))


def test_a_nonfinite_state_is_never_saved(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=3)
  bad = _state(1)
  bad["w"] = bad["w"].at[3].set(jnp.nan)
  with pytest.raises(ValueError, match="non-finite values in w"):
    checkpointer.save(1, bad, {}, {})
  checkpointer.close()
  assert _reopen(tmp_path / "ckpt").all_steps() == []


def _make_unreadable(path):
  """Puts a UNIX socket where the file was: open() fails with ENXIO even for root (chmod 000
  does not stop root, which CI runs as). Returns a function that puts the file back."""
  import socket

  content = path.read_bytes()
  os.remove(path)
  sock = socket.socket(socket.AF_UNIX)
  sock.bind(str(path))

  def restore():
    sock.close()
    os.remove(path)
    path.write_bytes(content)

  return restore


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_read_error_stops_the_run_and_moves_nothing(tmp_path, caplog):
  directory = _saved(tmp_path)
  put_back = _make_unreadable(directory / "4" / "data" / "metadata")
  with caplog.at_level(logging.WARNING), pytest.raises(ckpt_lib.CheckpointReadError) as error:
    _quick_retries(directory).restore_latest(_abstract())
  message = str(error.value)
  assert "step 4 could not be read after 4 attempts" in message
  assert "data/metadata" in message and "Nothing was moved" in message
  assert caplog.text.count("read error, retrying") == ckpt_lib.READ_ATTEMPTS - 1
  assert sorted(os.listdir(directory)) == ["2", "4"]  # nothing set aside, no fall back to 2
  put_back()
  assert _reopen(directory).restore_latest(_abstract())[1] == {"position": 4}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_transient_read_error_is_retried_and_the_newest_checkpoint_restores(tmp_path):
  import threading

  directory = _saved(tmp_path)
  put_back = _make_unreadable(directory / "4" / "loop" / "metadata")
  checkpointer = ckpt_lib.Checkpointer(str(directory), every=2, keep=3, read_backoff_s=(1.0,))
  timer = threading.Timer(0.3, put_back)  # the mount comes back during the first pause
  timer.start()
  try:
    _, data, loop = checkpointer.restore_latest(_abstract())
  finally:
    timer.join()
  assert data == {"position": 4} and loop == {"elapsed": 4.0}
  assert sorted(os.listdir(directory)) == ["2", "4"]


def test_unreadable_file_reports_present_files_only(tmp_path):
  (tmp_path / "a").write_text("x")
  assert ckpt_lib.unreadable_file(str(tmp_path)) is None
  assert ckpt_lib.unreadable_file(str(tmp_path / "missing")) is None
  _make_unreadable(tmp_path / "a")
  assert ckpt_lib.unreadable_file(str(tmp_path)).startswith(str(tmp_path / "a") + ": ")


def test_read_loop_reads_the_loop_item_alone_and_verifies_it(tmp_path):
  directory = _saved(tmp_path)
  assert _reopen(directory).read_loop(4) == {"elapsed": 4.0}
  path = directory / "4" / "loop" / "metadata"
  path.write_text(path.read_text().replace("4.0", "5.0"))
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="loop item"):
    _reopen(directory).read_loop(4)
