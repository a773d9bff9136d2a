"""Orbax checkpoints that resume exactly: train state + data position + loop bookkeeping.

One checkpoint (a numbered folder under `workdir/checkpoints`) holds three items:
  state  the `TrainState` pytree (params, optimizer state, model state, step, key);
  data   the training iterator's `get_state()` (JSON), so the next batch after a resume is the
         batch the interrupted run would have drawn;
  loop   JSON bookkeeping of the loop (elapsed training seconds, non-finite steps seen).
Saves are asynchronous (training goes on while files are written); `close()` waits for the last
one, since orbax otherwise drops a save still in flight when the process exits.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Save every `every` steps, keep the newest `keep`, restore the latest."""

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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "loop"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, loop_state: dict, *,
           force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or when forced). Returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            loop=ocp.args.JsonSave(loop_state),
        ),
        force=True,
    )

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores `(state, data_state, loop_state)` at `step` (default: latest).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (from
    `jax.eval_shape`), so arrays come back already placed on the mesh.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    logging.info("restoring checkpoint at step %d from %s", step, self.directory)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            loop=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.data, restored.loop

  def close(self) -> None:
    """Blocks until every pending save is committed to disk."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """`ShapeDtypeStruct`s (with shardings) of a pytree of arrays, for `Checkpointer.restore`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
