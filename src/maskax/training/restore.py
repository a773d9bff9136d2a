"""A trained run's parameters, for using them: no optimizer, data iterator or training task.

`restore_params(workdir)` reads only the `params` and `model_state` arrays of one checkpoint
(orbax partial restore: the optimizer state, often twice the parameters' size, is never read),
checks them against the checkpoint's CRC-32 record, and returns them as host NumPy arrays with
the run's resolved config. Host arrays fit any device count: put them on one device, replicate
them over a mesh, or hand them to an exporter. Files an experiment keeps beside its checkpoints
(a vocabulary, a tokenizer) are found through `Trained.workdir`.

Nothing in the workdir is written: predicting or exporting never touches the training record.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from maskax.training import checkpoint as ckpt_lib
from maskax.training import integrity
from maskax.training import paths
from maskax.training import runs

# The parts of the train state a model needs at inference (`train.TrainState` field names).
PARTS = ("params", "model_state")


@dataclasses.dataclass(frozen=True)
class Trained:
  """What `restore_params` returns."""

  params: Any  # pytree of np.ndarray, as the model's `init` made it
  model_state: Any  # batch-norm statistics, carried RNN state, ... ({} when none)
  step: int  # the checkpoint's step (updates applied)
  config: dict  # the run's resolved config (nested dicts), as it trained
  workdir: str


def restore_params(workdir: str, step: int | None = None) -> Trained:
  """The parameters and model state of `workdir`'s newest checkpoint (or of `step`).

  Raises FileNotFoundError when the workdir has no checkpoint, ValueError naming the steps
  that exist when `step` is not one of them, and `checkpoint.CorruptCheckpointError` when the
  arrays cannot be decoded or do not match their checksums (`CheckpointReadError` when a file
  exists but cannot be read).
  """
  # Absolute: orbax cannot read a checkpoint through a relative path (`--workdir=runs/x`).
  directory = os.path.join(paths.absolute(workdir), "checkpoints")
  steps = paths.committed_steps(directory)
  if not steps:
    raise FileNotFoundError(
      f"{workdir} holds no checkpoint: train it first (the same launch "
      "command with --workdir) or point --workdir at a trained run."
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(
      f"{workdir} has no checkpoint at step {step}; it has steps {', '.join(map(str, steps))}."
    )
  path = os.path.join(directory, str(step), "state")
  reader = ocp.PyTreeCheckpointer()
  try:
    # The handler's metadata, not the checkpointer's: that one also looks for a step metadata
    # file the `state` item never has and logs a warning on every restore.
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
    wanted = {k: tree[k] for k in PARTS if tree.get(k)}  # an empty model_state is not saved
    restored = reader.restore(
      path,
      args=ocp.args.PyTreeRestore(
        item=wanted,
        partial_restore=True,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
      ),
    )
  except Exception as e:  # orbax and tensorstore raise many types for missing/short files
    raise ckpt_lib.read_failure(path, e) from e
  record = ckpt_lib.Checkpointer(directory, every=1, keep=1, reader=True)
  try:
    loop, expected = record.read_records(step)
  finally:
    record.close()
  actual = integrity.tree_digests(restored)
  bad = [k for k, v in actual.items() if expected.get("state", {}).get(k) != v]
  if bad:
    raise ckpt_lib.CorruptCheckpointError(
      f"{path} does not match its checksums: {', '.join(bad[:5])}"
    )
  config = loop.get("config") or runs.read_run_record(workdir).get("config", {})
  return Trained(
    params=restored["params"],
    model_state=restored.get("model_state", {}),
    step=step,
    config=config,
    workdir=workdir,
  )
