"""Orbax checkpoints that resume exactly and are checked before they are trusted.

One checkpoint (a numbered folder under `workdir/checkpoints`) holds four items:
  state      the `TrainState` pytree (params, optimizer state, model state, step, key);
  data       the training iterator's `get_state()` (JSON), so the next batch after a resume is
             the batch the interrupted run would have drawn;
  loop       JSON bookkeeping of the loop (elapsed training seconds, non-finite steps seen);
  integrity  CRC-32 of every array and of the two JSON items (`maskax.integrity`).
Every process calls `save` and `restore`; orbax writes the shards of all processes into the one
folder (the JSON items are written by process 0). Saves are asynchronous: a folder appears under
its step number only once every file is committed, so a save killed half-way leaves only a tmp
folder that orbax ignores and deletes. `close()` waits for the last save, since orbax otherwise
drops a save still in flight when the process exits.

`restore_latest` verifies the newest checkpoint and falls back to older ones when it is damaged
(empty, half-copied, truncated or altered files); the damaged folders are renamed
`STEP.corrupt-TIME` so that orbax no longer lists them and the step can be saved again.
A complete checkpoint saved before checksums existed (orbax's step metadata lists no
`integrity` item) is restored unverified, with a warning.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from maskax import integrity

ITEMS = ("state", "data", "loop", "integrity")


class CorruptCheckpointError(RuntimeError):
  """A checkpoint failed to restore or does not match its integrity record."""


class Checkpointer:
  """Save every `every` steps, keep the newest `keep`, restore the newest intact one."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    if every <= 0:
      raise ValueError(f"checkpoint_every={every} must be positive.")
    if keep <= 0:
      raise ValueError(f"keep_checkpoints={keep} must be positive.")
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        # A folder left by a save that was killed half-way is only a tmp folder: orbax skips it.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, force=force)` would write (before checking what exists)."""
    return force or step % self.every == 0

  def save(self, step: int, state: Any, data_state: dict, loop_state: dict, *,
           force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or when forced). Returns whether it saved."""
    if not self.due(step, force=force):
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            loop=ocp.args.JsonSave(loop_state),
            integrity=ocp.args.JsonSave(integrity.record(state, data_state, loop_state)),
        ),
        force=True,
    )

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores and verifies `(state, data_state, loop_state)` at `step` (default: latest).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (from
    `jax.eval_shape`), so arrays come back already placed on the mesh. Raises
    CorruptCheckpointError when orbax cannot read the folder or the content differs from the
    integrity record saved with it.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    path = os.path.join(self.directory, str(step))
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                 loop=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore())
    legacy = self._predates_integrity(step)
    if legacy:
      del items["integrity"]
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many types for missing/short files
      first_line = (str(e).strip().splitlines() or [""])[0][:200]
      raise CorruptCheckpointError(f"{path} cannot be read ({type(e).__name__}: "
                                   f"{first_line})") from e
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

  def _predates_integrity(self, step: int) -> bool:
    # Orbax records the items a save wrote; a half-copied folder lacks that record (or lists
    # `integrity`), so only a complete save from before checksums counts as old.
    try:
      saved = set(self._manager.metadata(step).item_handlers or ())
    except Exception:  # unreadable metadata: damaged, not old
      return False
    return {"state", "data", "loop"} <= saved and "integrity" not in saved

  def restore_latest(self, abstract_state: Any, *,
                     agree: Callable[[bool], bool] = bool):
    """The newest intact checkpoint as `(state, data_state, loop_state)`, or None if none exist.

    Damaged newer checkpoints are logged with a warning naming their step, then set aside.
    `agree(bad) -> bool` must return True on every process when any process found the
    checkpoint bad (e.g. `sharding.make_any_process`), so all processes fall back together.
    Raises CorruptCheckpointError naming every step when no checkpoint is intact (nothing is
    renamed then, so a re-run cannot silently start from scratch).
    """
    problems, bad_steps = [], []
    for step in reversed(self.all_steps()):
      try:
        result, problem = self.restore(abstract_state, step), None
      except CorruptCheckpointError as e:
        result, problem = None, str(e)
      if agree(problem is not None):
        problem = problem or "another process could not restore it"
        logging.warning("checkpoint at step %d is unusable, trying an older one: %s",
                        step, problem)
        problems.append(f"step {step}: {problem}")
        bad_steps.append(step)
        continue
      if bad_steps:
        logging.warning("resuming from step %d; damaged checkpoint(s) at step(s) %s renamed "
                        "to STEP.corrupt-*", step, bad_steps)
        self._set_aside(bad_steps)
      return result
    if problems:
      raise CorruptCheckpointError(
          f"no intact checkpoint in {self.directory}:\n  " + "\n  ".join(problems)
          + "\nRestore the folder from a copy, or move it away to start training from scratch.")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        source = os.path.join(self.directory, str(step))
        os.rename(source, f"{source}.corrupt-{stamp}")
    ocp.multihost.sync_global_processes("maskax_set_aside_corrupt_checkpoints")
    self._manager.reload()

  def close(self) -> None:
    """Blocks until every pending save is committed to disk."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """`ShapeDtypeStruct`s (with shardings) of a pytree of arrays, for `Checkpointer.restore`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
