"""Masked per-step regression on padded sequences: the smallest experiment the loop runs.

It exists to exercise `maskax.training.train` end to end (checkpoints, resume, sharding, sweeps, the
non-finite guard) in seconds, on the theme of the library: padded steps hold garbage (NaN by
default) and the masked token-mean loss must never see it.

  python launch.py --config=experiments/example_regression.py:smoke
Hardware: any CPU; `smoke` takes seconds, the default about 20 s on a 2-core CPU.
Expected: eval/mse falls from ~0.6 towards the noise floor (0.01).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.masking import losses, masks
from maskax.training import train
from maskax.data import iterators

# Slowing the data pipeline (tests that signal or kill a run mid-way) changes no number.
RESUME_SAFE_KEYS = ("debug.step_delay_s",)

PRESETS = {
  "default": "128-wide MLP, 600 steps (about 20 s on a 2-core CPU)",
  "smoke": "tiny MLP, 6 steps, checkpoint every 2 (seconds; for tests)",
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; presets: {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, training batches and per-step keys derive from it
  c.data = ml_collections.ConfigDict()
  c.data.seed = 0  # the held-out batches derive from it, not from `seed`: every training seed
  # is scored on the same held-out set
  c.data.features = 8  # F, input features per step
  c.data.max_length = 16  # T, padded length
  c.data.noise = 0.1  # std of the target noise (MSE floor = noise**2)
  c.data.pad_value = float("nan")  # what padded steps hold: the loss must not care
  c.data.eval_batches = 4  # held-out batches per evaluation
  c.model = ml_collections.ConfigDict()
  c.model.hidden = 128  # MLP width
  c.loss = ml_collections.ConfigDict()
  c.loss.mode = "token_mean"  # token_mean | sequence_mean | batch_mean | full_mean
  c.train = common.train_config()  # + the loop's shared defaults (experiments/common.py)
  c.train.steps = 600
  c.train.batch_size = 32  # global batch, split over devices and processes
  c.train.learning_rate = 3e-3
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.debug = ml_collections.ConfigDict()
  c.debug.inject_nonfinite_at_step = 0  # >0: put an inf into that step's valid inputs (tests)
  c.debug.step_delay_s = 0.0  # >0: sleep in the data pipeline (tests that kill mid-run)
  if arg == "smoke":
    c.model.hidden = 16
    common.smoke_loop(c.train, steps=6)
    c.data.eval_batches = 1
  return c


class MLP(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):  # f32[B, T, F] -> f32[B, T, 1]
    return nn.Dense(1)(nn.tanh(nn.Dense(self.hidden)(x)))


def make_batch_fn(data_config, inject_at_position: int = -1):
  """`(rng, n) -> {x f32[n, T, F], y f32[n, T, 1], lengths i32[n]}`; padding holds pad_value."""
  F, T = data_config.features, data_config.max_length
  w = np.random.default_rng(1234).normal(size=(F,)) / np.sqrt(F)  # the rule to learn, fixed

  def make(rng, n, position=None):
    x = rng.normal(size=(n, T, F)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=n).astype(np.int32)
    y = np.sin(3 * x @ w)[..., None] + data_config.noise * rng.normal(size=(n, T, 1))
    valid = np.arange(T)[None, :] < lengths[:, None]
    x = np.where(valid[..., None], x, data_config.pad_value).astype(np.float32)
    y = np.where(valid[..., None], y, data_config.pad_value).astype(np.float32)
    return {"x": x, "y": y, "lengths": lengths}

  return make


class _Injecting(iterators.SyntheticBatches):
  """Puts an inf into a valid input of one batch (position = step - 1): tests the guard."""

  def __init__(self, *args, inject_position: int, delay_s: float, **kw):
    super().__init__(*args, **kw)
    self._inject, self._delay = inject_position, delay_s

  def __next__(self):
    position = self.position
    batch = super().__next__()
    if position == self._inject:
      batch["x"] = batch["x"].copy()
      batch["x"][0, 0, 0] = np.inf
    if self._delay:
      import time

      time.sleep(self._delay)
    return batch


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  model = MLP(config.model.hidden)
  make = make_batch_fn(config.data)
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_data = _Injecting(
    make,
    config.train.batch_size,
    config.seed,
    inject_position=config.debug.inject_nonfinite_at_step - 1,
    delay_s=config.debug.step_delay_s,
    **proc,
  )
  eval_iter = iterators.SyntheticBatches(
    make, config.train.batch_size, config.data.seed + 1, **proc
  )
  eval_batches = [next(eval_iter) for _ in range(config.data.eval_batches)]

  def init(key):
    dummy = jnp.zeros((1, config.data.max_length, config.data.features))
    return model.init(key, dummy)["params"], {}

  def loss(params, model_state, batch, key, *, train):
    del key, train
    T = batch["x"].shape[1]
    step_mask = masks.sequence_mask(batch["lengths"], T)  # bool[B, T]
    # Padded inputs are NaN: zero them before the model so its outputs there stay finite;
    # the loss masks them anyway, this just keeps the padded predictions readable.
    x = jnp.where(step_mask[..., None], batch["x"], 0.0)
    pred = model.apply({"params": params}, x)
    mse = losses.masked_mse(pred, batch["y"], step_mask[..., None], mode=config.loss.mode)
    return {"mse": mse}, {}, model_state

  task = train.Task(
    init=init,
    loss=loss,
    optimizer=optax.adam(config.train.learning_rate),
    train_data=train_data,
    eval_data=lambda: eval_batches,
  )
  _, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  return final
