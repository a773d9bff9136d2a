"""Masked per-step regression on padded sequences: the smallest complete experiment.

The template to copy when adding an experiment (README, "Adding an experiment"): it declares
the config, the data, the model and the loss, and `maskax.training.train` does the rest
(sharding, checkpoints and resume, evaluation, progress). On the library's theme: padded steps
hold garbage (NaN by default) and the masked token-mean loss must never see it.

  python launch.py --config=experiments/example_regression.py:smoke
Hardware: any CPU; `smoke` takes seconds, the default about 20 s on a 2-core CPU.
Expected: eval/mse falls from ~0.6 towards the noise floor (0.01).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.data import iterators
from maskax.masking import losses, masks
from maskax.training import train

PRESETS = {
  "default": "128-wide MLP, 600 steps (about 20 s on a 2-core CPU)",
  "smoke": "tiny MLP, 6 steps, checkpoint every 2 (seconds; for tests)",
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = common.preset(arg, PRESETS)
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
  if arg == "smoke":
    c.model.hidden = 16
    common.smoke_loop(c.train, steps=6)
    c.data.eval_batches = 1
  return c


def _batch_fn(d):
  """`(rng, n) -> {x f32[n, T, F], y f32[n, T, 1], lengths i32[n]}`; padding holds pad_value."""
  F, T = d.features, d.max_length
  w = np.random.default_rng(1234).normal(size=(F,)) / np.sqrt(F)  # the rule to learn, fixed

  def make(rng, n):
    x = rng.normal(size=(n, T, F)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=n).astype(np.int32)
    y = np.sin(3 * x @ w)[..., None] + d.noise * rng.normal(size=(n, T, 1))
    valid = np.arange(T)[None, :] < lengths[:, None]
    x = np.where(valid[..., None], x, d.pad_value).astype(np.float32)
    y = np.where(valid[..., None], y, d.pad_value).astype(np.float32)
    return {"x": x, "y": y, "lengths": lengths}

  return make


def make_data(config):
  """(training iterator, held-out batches): process-local rows of seeded synthetic batches."""
  make, B = _batch_fn(config.data), config.train.batch_size
  train_data = iterators.SyntheticBatches(make, B, config.seed, **common.this_process())
  held_out = iterators.SyntheticBatches(make, B, config.data.seed + 1, **common.this_process())
  return train_data, [next(held_out) for _ in range(config.data.eval_batches)]


class MLP(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):  # f32[B, T, F] -> f32[B, T, 1]
    return nn.Dense(1)(nn.tanh(nn.Dense(self.hidden)(x)))


def make_model(config) -> MLP:
  return MLP(config.model.hidden)


def make_loss(config, model):
  """Masked MSE over the valid steps, as a `(total, weight)` pair in `loss.mode`."""

  def loss(params, model_state, batch, key, *, train):
    del key, train
    step_mask = masks.sequence_mask(batch["lengths"], batch["x"].shape[1])  # bool[B, T]
    # Padded inputs are NaN: zero them before the model so its outputs there stay finite;
    # the loss masks them anyway, this just keeps the padded predictions readable.
    x = jnp.where(step_mask[..., None], batch["x"], 0.0)
    pred = model.apply({"params": params}, x)
    mse = losses.masked_mse(pred, batch["y"], step_mask[..., None], mode=config.loss.mode)
    return {"mse": mse}, {}, model_state

  return loss


def make_task(config) -> train.Task:
  model = make_model(config)
  train_data, eval_batches = make_data(config)

  def init(key):
    dummy = jnp.zeros((1, config.data.max_length, config.data.features))
    return model.init(key, dummy)["params"], {}

  return train.Task(
    init=init,
    loss=make_loss(config, model),
    optimizer=optax.adam(config.train.learning_rate),
    train_data=train_data,
    eval_data=lambda: eval_batches,  # without eval_sums: the pairs of loss(train=False)
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  options = train.LoopOptions.from_config(config.train)
  _, final = train.train(make_task(config), options, workdir, seed=config.seed)
  return final
