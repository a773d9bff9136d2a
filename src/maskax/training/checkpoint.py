"""Orbax checkpoints that resume exactly and are checked before they are trusted.

One checkpoint (a numbered folder under `workdir/checkpoints`) holds four items:
  state      the `TrainState` pytree (params, optimizer state, model state, step, key);
  data       the training iterator's `get_state()` (JSON), so the next batch after a resume is
             the batch the interrupted run would have drawn;
  loop       JSON bookkeeping of the loop (elapsed training seconds, non-finite steps seen);
  integrity  CRC-32 of every array and of the two JSON items (`maskax.training.integrity`).
Every process calls `save` and `restore`; orbax writes the shards of all processes into the one
folder (the JSON items are written by process 0). Saves are asynchronous: a folder appears under
its step number only once every file is committed, so a save killed half-way leaves only a tmp
folder that orbax ignores and deletes. `close()` waits for the last save, since orbax otherwise
drops a save still in flight when the process exits.

Everything handed to an asynchronous save is a snapshot: the JSON items are copied (through a
JSON round trip) before the checksum is taken, because orbax serialises them later, in the
background, while the loop goes on mutating its own dicts. A state with a non-finite float is
never saved (the train step refuses such updates; this is the last line of defence).

`restore_latest` verifies the newest checkpoint and falls back to older ones when its content is
provably damaged (empty, half-copied, truncated or altered files); the damaged folders are
renamed `STEP.corrupt-TIME` so that orbax no longer lists them and the step can be saved again.
A *read error* is not damage: when a file of the folder exists but cannot be read (permission
denied, an NFS/gcsfuse I/O error), the restore is retried a few times and then the run stops
with `CheckpointReadError`, leaving every folder as it was.
A complete checkpoint saved before checksums existed (orbax's step metadata lists no
`integrity` item) is restored unverified, with a warning.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from maskax.training import integrity, paths

ITEMS = ("state", "data", "loop", "integrity")
# Restore attempts on a read error before the run stops, and the pause before each retry:
# long enough to ride out a remounted volume or a throttled bucket, short enough to fail fast.
READ_ATTEMPTS = 4
READ_BACKOFF_S = (1.0, 4.0, 15.0)


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's content is provably wrong: missing or short files, or a checksum mismatch."""


class CheckpointReadError(RuntimeError):
  """A checkpoint's files exist but cannot be read now (permissions, I/O); nothing was moved."""


def _handlers() -> dict:
  # Registering every item's handler lets orbax read step metadata (and restore a subset of the
  # items) without a warning per item that it "could not be restored".
  return dict(
    state=ocp.StandardCheckpointHandler(),
    data=ocp.JsonCheckpointHandler(),
    loop=ocp.JsonCheckpointHandler(),
    integrity=ocp.JsonCheckpointHandler(),
  )


def json_snapshot(value: Any) -> Any:
  """A deep, JSON-normalised copy: what an async save serialises later is what we checksum now."""
  return json.loads(json.dumps(value))


def unreadable_file(path: str) -> str | None:
  """`'FILE: <error>'` for the first file under `path` that exists but cannot be opened and read
  (or a folder that cannot be listed); None when every present file reads. A missing file is
  not reported: that is damage, not a read error."""
  problems = []
  for root, _, files in paths.as_path(path).walk(on_error=problems.append):
    for name in files:
      file = os.path.join(root, name)
      try:
        with paths.as_path(file).open("rb") as f:
          f.read(1)
      except FileNotFoundError:
        continue
      except OSError as e:
        return f"{file}: {e.strerror or e}"
  for e in problems:
    if not isinstance(e, FileNotFoundError):
      return f"{e.filename}: {e.strerror or e}"
  return None


def read_failure(path: str, e: BaseException) -> RuntimeError:
  """The error for a failed read of `path`: CheckpointReadError when a present file cannot be
  read (or the OS said so), else CorruptCheckpointError (missing, short or undecodable files)."""
  unreadable = unreadable_file(path)
  if unreadable is not None or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError)):
    return CheckpointReadError(
      f"{path} cannot be read ({unreadable or type(e).__name__ + ': ' + _first_line(e)})"
    )
  return CorruptCheckpointError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)})")


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:200]


class Checkpointer:
  """Save every `every` steps, keep the newest `keep`, restore the newest intact one."""

  def __init__(
    self,
    directory: str,
    *,
    every: int,
    keep: int,
    async_save: bool = True,
    read_backoff_s: tuple[float, ...] = READ_BACKOFF_S,
    reader: bool = False,
  ):
    if every <= 0:
      raise ValueError(f"train.checkpoint_every={every} must be positive.")
    if keep <= 0:
      raise ValueError(f"train.keep_checkpoints={keep} must be positive.")
    # A URL goes to orbax as it is: orbax lists and renames through epath and writes arrays
    # through tensorstore's own gcs driver (with its own credentials: `gcloud auth
    # application-default login`, or the VM's service account).
    self.directory = paths.absolute(directory)
    self.every = every
    self.read_backoff_s = tuple(read_backoff_s)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=not reader,
      enable_async_checkpointing=async_save,
      # A folder left by a save that was killed half-way is only a tmp folder: orbax skips it.
      # A `reader` (one that only inspects) creates and cleans nothing. (orbax's own
      # read_only option warns three times each time it is used.)
      cleanup_tmp_directories=not reader,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=_handlers()
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, force=force)` would write (before checking what exists)."""
    return force or step % self.every == 0

  def save(
    self, step: int, state: Any, data_state: dict, loop_state: dict, *, force: bool = False
  ) -> bool:
    """Saves when `step` is a multiple of `every` (or when forced). Returns whether it saved.

    The caller may change `data_state` and `loop_state` as soon as this returns. Raises
    ValueError (and saves nothing) when a float array of `state` holds NaN or inf.
    """
    if not self.due(step, force=force):
      return False
    if step in self._manager.all_steps():
      return False
    data_state, loop_state = json_snapshot(data_state), json_snapshot(loop_state)
    host = integrity.host_leaves(state)  # one device-to-host copy for both checks
    nonfinite = integrity.nonfinite(host)
    if nonfinite:
      raise ValueError(
        f"refusing to checkpoint step {step}: non-finite values in " + ", ".join(nonfinite[:5])
      )
    record = integrity.record(state, data_state, loop_state, host=host)
    return self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        loop=ocp.args.JsonSave(loop_state),
        integrity=ocp.args.JsonSave(record),
      ),
      force=True,
    )

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _read(self, step: int, items: dict):
    """orbax restore of `items` at `step`, sorting failures into read errors and damage."""
    path = self._step_path(step)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many types for missing/short files
      raise read_failure(path, e) from e

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores and verifies `(state, data_state, loop_state)` at `step` (default: latest).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (from
    `jax.eval_shape`), so arrays come back already placed on the mesh. Raises
    CorruptCheckpointError when files are missing or short or the content differs from the
    integrity record saved with it, CheckpointReadError when present files cannot be read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    path = self._step_path(step)
    items = dict(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
      loop=ocp.args.JsonRestore(),
      integrity=ocp.args.JsonRestore(),
    )
    legacy = self._predates_integrity(step)
    if legacy:
      del items["integrity"]
    restored = self._read(step, items)
    if legacy:
      logging.warning("%s was saved before maskax stored checksums: restored unverified.", path)
      return restored.state, restored.data, restored.loop
    if not isinstance(restored.integrity, dict):
      raise CorruptCheckpointError(f"{path} has no integrity record")
    bad = integrity.mismatches(restored.integrity, restored.state, restored.data, restored.loop)
    if bad:
      shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
      raise CorruptCheckpointError(f"{path} does not match its checksums: {shown}")
    return restored.state, restored.data, restored.loop

  def read_loop(self, step: int) -> dict:
    """The verified `loop` item of `step` alone (no arrays are read); raises like `restore`."""
    return self.read_records(step)[0]

  def read_records(self, step: int) -> tuple[dict, dict]:
    """`(loop, integrity record)` of `step`, the loop verified against the record; no arrays are
    read (the record also verifies a partial restore of them). Raises like `restore`."""
    items = dict(loop=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore())
    restored = self._read(step, items)
    record = restored.integrity if isinstance(restored.integrity, dict) else {}
    if record.get("loop") != integrity.json_digest(restored.loop):
      raise CorruptCheckpointError(
        f"{self._step_path(step)}: loop item does not match its checksum"
      )
    return restored.loop, record

  def _predates_integrity(self, step: int) -> bool:
    # Orbax records the items a save wrote; a half-copied folder lacks that record (or lists
    # `integrity`), so only a complete save from before checksums counts as old.
    try:
      saved = set(self._manager.metadata(step).item_handlers or ())
    except Exception:  # unreadable metadata: damaged (or unreadable, which `_read` then finds)
      return False
    return {"state", "data", "loop"} <= saved and "integrity" not in saved

  def _restore_retrying(self, abstract_state, step, agree):
    """`restore(step)`, retried while some process meets a read error; then CheckpointReadError
    on every process. Returns `(result, problem)`: problem is the damage found, else None."""
    for attempt in range(READ_ATTEMPTS):
      try:
        result, problem, read_error = self.restore(abstract_state, step), None, None
      except CorruptCheckpointError as e:
        result, problem, read_error = None, str(e), None
      except CheckpointReadError as e:
        result, problem, read_error = None, None, e
      if not agree(read_error is not None):
        return result, problem
      message = str(read_error or "another process could not read it")
      if attempt + 1 < READ_ATTEMPTS:
        pause = self.read_backoff_s[min(attempt, len(self.read_backoff_s) - 1)]
        logging.warning(
          "checkpoint at step %d: read error, retrying in %.0f s: %s", step, pause, message
        )
        time.sleep(pause)
    raise CheckpointReadError(
      f"checkpoint at step {step} could not be read after {READ_ATTEMPTS} attempts: {message}."
      " Nothing was moved or deleted. Fix access to the folder (permissions, mount, network)"
      " and run the same command again."
    )

  def restore_latest(self, abstract_state: Any, *, agree: Callable[[bool], bool] = bool):
    """The newest intact checkpoint as `(state, data_state, loop_state)`, or None if none exist.

    Damaged newer checkpoints are logged with a warning naming their step, then set aside.
    A read error is retried, then raised as CheckpointReadError with nothing set aside.
    `agree(flag) -> bool` must return True on every process when any process passed True
    (e.g. `sharding.make_any_process`), so all processes retry and fall back together; it is
    called the same number of times on every process.
    Raises CorruptCheckpointError naming every step when no checkpoint is intact (nothing is
    renamed then, so a re-run cannot silently start from scratch).
    """
    problems, bad_steps = [], []
    for step in reversed(self.all_steps()):
      result, problem = self._restore_retrying(abstract_state, step, agree)
      if agree(problem is not None):
        problem = problem or "another process could not restore it"
        logging.warning("checkpoint at step %d is unusable, trying an older one: %s", step, problem)
        problems.append(f"step {step}: {problem}")
        bad_steps.append(step)
        continue
      if bad_steps:
        logging.warning(
          "resuming from step %d; damaged checkpoint(s) at step(s) %s renamed to STEP.corrupt-*",
          step,
          bad_steps,
        )
        self._set_aside(bad_steps)
      return result
    if problems:
      raise CorruptCheckpointError(
        f"no intact checkpoint in {self.directory}:\n  "
        + "\n  ".join(problems)
        + "\nRestore the folder from a copy, or move it away to start training from scratch."
      )
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        source = self._step_path(step)
        # On an object store this is a copy of every object, then a delete: not atomic, but a
        # kill half-way leaves the step still damaged, and set aside again by the next resume.
        paths.as_path(source).rename(f"{source}.corrupt-{stamp}")
    ocp.multihost.sync_global_processes("maskax_set_aside_corrupt_checkpoints")
    self._manager.reload()

  def close(self) -> None:
    """Blocks until every pending save is committed to disk."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """`ShapeDtypeStruct`s (with shardings) of a pytree of arrays, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
