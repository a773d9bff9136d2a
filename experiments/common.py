"""Config defaults shared by every experiment: the training loop's safety and bookkeeping knobs.

Not an experiment (it has no `get_config`, so `launch.py --list` skips it). Each experiment still sets
its own steps, batch size, learning rate and log/eval/checkpoint intervals in `get_config`.
"""

import ml_collections


def train_config() -> ml_collections.ConfigDict:
  """`config.train` pre-filled with the loop fields that no experiment changes by default."""
  t = ml_collections.ConfigDict()
  t.keep_checkpoints = 2  # newest checkpoints kept in WORKDIR/checkpoints
  t.grad_accum_steps = 1  # micro-batches per step (exact for every normalisation)
  t.on_nonfinite = "stop"  # stop | skip: what a non-finite loss or gradient does
  t.max_nonfinite_steps = 1  # with 'stop': how many skipped steps end the run
  t.async_checkpoints = True  # write checkpoints while training goes on
  return t


def smoke_loop(train: ml_collections.ConfigDict, *, batch_size: int = 8, steps: int = 4) -> None:
  """Sets the `smoke` preset's loop on `config.train`: `steps` steps of `batch_size` rows, a log
  line and a checkpoint every 2 steps, evaluation only at the end. The smoke tests resume these
  runs from step 4 and look for checkpoints 4 and 6, so every experiment shares the schedule."""
  train.steps = steps
  train.batch_size = batch_size
  train.log_every = 2
  train.eval_every = 0
  train.checkpoint_every = 2
