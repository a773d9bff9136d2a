"""Config defaults and small helpers shared by every experiment.

Not an experiment (it has no `get_config`, so `launch.py --list` skips it). Each experiment still sets
its own steps, batch size, learning rate and log/eval/checkpoint intervals in `get_config`.
"""

import math
from typing import Mapping

import jax
import ml_collections


def preset(arg: str, presets: Mapping[str, str]) -> str:
  """`get_config`'s argument checked against the experiment's PRESETS ('' = 'default')."""
  arg = arg or "default"
  if arg not in presets:
    raise ValueError(f"unknown preset {arg!r}; presets: {', '.join(presets)}")
  return arg


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


def this_process() -> dict[str, int]:
  """The keyword arguments by which the data iterators load only this process's rows."""
  return dict(process_index=jax.process_index(), process_count=jax.process_count())


def per_second(final: Mapping[str, float], per_step: float) -> float:
  """Throughput: the loop's `steps_per_s` for the whole run (compilation and evaluation left
  out, resumes included) times what one step processes (tokens, images)."""
  return final.get("steps_per_s", math.nan) * per_step
