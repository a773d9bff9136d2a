"""Recurrent forecasting over partially observed features: input strategies and the model.

A validity mask `bool[B, T, F]` (True = observed) covers both missing features and missing
timesteps (docs/design.md, "Feature masks"). The model never reads a value where the mask is False:
each strategy first replaces missing entries, then (except `zero_fill`) appends the mask as
indicator features, as in Lipton, Kale & Wetzel, "Directly Modeling Missing Data in Sequences
with RNNs" (MLHC 2016) and Che et al., "Recurrent Neural Networks for Multivariate Time Series
with Missing Values" (GRU-D, Sci. Rep. 2018), whose `mean` fill is the empirical mean:
  indicator     [x with missing entries zeroed, mask]                 2F inputs
  zero_fill     x with missing entries zeroed (0 = "black" = missing)  F inputs
  forward_fill  [last observed value (fill_value before any), mask]   2F inputs
  mean_fill     [x with missing entries set to fill_value, mask]      2F inputs
A step with nothing observed freezes the carry (the padded scan's step mask), so a frozen step
costs the state nothing; its output repeats the last forecast (`carry_forward`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskax.masking import losses, masks
from maskax.rnn.scan import PaddedRNN

STRATEGIES = ("indicator", "zero_fill", "forward_fill", "mean_fill")


def _check(x, fmask):
  if x.ndim < 2 or fmask.shape != x.shape or fmask.dtype != jnp.bool_:
    raise ValueError(
      f"fmask must be bool with the shape of x f32[..., T, F]; got x {x.shape},"
      f" fmask {fmask.dtype}{list(fmask.shape)} (True = observed)."
    )


def _fill(fill_value, x):
  """fill_value (None = 0) as f32[F] broadcast to x's rank (rank promotion is an error)."""
  features = x.shape[-1]
  if fill_value is None:
    fill = jnp.zeros((features,), x.dtype)
  else:
    fill = jnp.asarray(fill_value, x.dtype)
  if fill.shape != (features,):
    raise ValueError(f"fill_value must be f32[F={features}], got shape {fill.shape}.")
  return jnp.broadcast_to(fill.reshape((1,) * (x.ndim - 1) + (features,)), x.shape)


def forward_fill(x, fmask, *, fill_value=None):
  """Last observed value of each feature at or before each step (causal).

  x: f32[..., T, F]; fmask: bool[..., T, F]; fill_value: f32[F] for steps before a feature's
  first observation (None = 0). Returns f32[..., T, F]. Values at missing entries (NaN
  included) are never read, and their gradient is exactly 0.
  """
  x, fmask = jnp.asarray(x), jnp.asarray(fmask)
  _check(x, fmask)
  steps = x.shape[-2]
  t = jnp.arange(steps, dtype=jnp.int32).reshape((1,) * (x.ndim - 2) + (steps, 1))
  seen = jnp.where(fmask, jnp.broadcast_to(t, x.shape), -1)
  last = jax.lax.cummax(seen, axis=x.ndim - 2)  # i32[..., T, F]: index of the last observation
  clean = jnp.where(fmask, x, 0.0)
  gathered = jnp.take_along_axis(clean, jnp.maximum(last, 0), axis=-2)
  return jnp.where(last >= 0, gathered, _fill(fill_value, x))


def build_inputs(x, fmask, *, strategy: str, fill_value=None):
  """The model input of one strategy (module docstring), never reading missing entries.

  x: f32[..., T, F]; fmask: bool[..., T, F]; fill_value: f32[F] | None (mean_fill's value and
  forward_fill's value before the first observation; None = 0). Returns f32[..., T, F] for
  zero_fill, else f32[..., T, 2F] (values, then the mask as 0/1).
  """
  x, fmask = jnp.asarray(x), jnp.asarray(fmask)
  _check(x, fmask)
  if strategy == "zero_fill":
    return jnp.where(fmask, x, 0.0)
  if strategy == "indicator":
    values = jnp.where(fmask, x, 0.0)
  elif strategy == "forward_fill":
    values = forward_fill(x, fmask, fill_value=fill_value)
  elif strategy == "mean_fill":
    values = jnp.where(fmask, x, _fill(fill_value, x))
  else:
    raise ValueError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)}.")
  return jnp.concatenate([values, fmask.astype(x.dtype)], axis=-1)


def last_value_forecast(x, fmask, *, fill_value=None):
  """Naive baseline: the forecast for step t+1 is each feature's last value observed at <= t.

  x: f32[B, T, F]; fmask: bool[B, T, F]. Returns f32[B, T, F] (row t = forecast of t+1).
  """
  return forward_fill(x, fmask, fill_value=fill_value)


def next_step_mse(pred, x, fmask):
  """Squared error of forecasts `pred[:, t]` against `x[:, t+1]`, observed targets and all.

  pred, x: f32[B, T, F]; fmask: bool[B, T, F]. Returns ((total, weight) over observed targets,
  (total, weight) over every target: the fully observed ground truth), each a pair of f32[].
  """
  pred, target, observed = pred[:, :-1], x[:, 1:], fmask[:, 1:]
  every = jnp.ones(observed.shape, jnp.bool_)
  return (
    losses.masked_mse(pred, target, observed, mode="token_mean"),
    losses.masked_mse(pred, target, every, mode="token_mean"),
  )


class FeatureMaskRNN(nn.Module):
  """GRU/LSTM next-step forecaster over partially observed features.

  __call__(x f32[B, T, F], fmask bool[B, T, F], *, fill_value f32[F] | None) -> f32[B, T, F],
  row t being the forecast of x[:, t+1]. With `freeze_missing_steps` a step with nothing
  observed leaves the carry unchanged (`step_mask_from_feature_mask`, rule 'any').
  """

  cell: str = "gru"
  hidden: int = 32
  strategy: str = "indicator"
  freeze_missing_steps: bool = True

  @nn.compact
  def __call__(self, x, fmask, *, fill_value=None):
    inputs = build_inputs(x, fmask, strategy=self.strategy, fill_value=fill_value)
    step_mask = masks.step_mask_from_feature_mask(fmask) if self.freeze_missing_steps else None
    h = PaddedRNN(self.cell, self.hidden, output_policy="carry_forward", name="rnn")(
      inputs, mask=step_mask
    )
    return nn.Dense(x.shape[-1], name="head")(h)


def make_loss(model: FeatureMaskRNN, fill_value):
  """The training loop's loss: masked MSE of the t+1 forecast over observed target channels
  (token mean) of a batch {x f32[B, T, F] (any value where missing), mask bool[B, T, F]}."""

  def loss(params, model_state, batch, key, *, train):
    del key, train
    pred = model.apply({"params": params}, batch["x"], batch["mask"], fill_value=fill_value)
    observed, _ = next_step_mse(pred, batch["x"], batch["mask"])
    return {"mse": observed}, {}, model_state

  return loss


def make_eval_sums(model: FeatureMaskRNN, fill_value):
  """The training loop's `eval_sums` over held-out batches {x, mask, truth f32[B, T, F] (fully
  observed), valid bool[B]}: MSE of the t+1 forecast over observed targets (`mse`), over every
  target against the truth (`full_mse`), and of the last observed value (`last_value_mse`)."""

  def eval_sums(params, model_state, batch, key):
    del model_state, key
    x, mask, rows = batch["x"], batch["mask"], batch["valid"][:, None, None]

    def mse(pred, y, counted):  # row t forecasts t + 1; filler rows (valid False) count nowhere
      return losses.masked_mse(pred[:, :-1], y[:, 1:], (counted & rows)[:, 1:])

    pred = model.apply({"params": params}, x, mask, fill_value=fill_value)
    last = last_value_forecast(x, mask, fill_value=fill_value)
    return {
      "mse": mse(pred, x, mask),
      "full_mse": mse(pred, batch["truth"], jnp.ones_like(mask)),
      "last_value_mse": mse(last, x, mask),
    }

  return eval_sums


def make_forecaster(model: FeatureMaskRNN, fill_value):
  """`forecast(params, x f32[B, T, F], mask bool[B, T, F], lengths i32[B]) -> (f32[B, T, F],
  next-step MSE over the observed next values or None)` on the host: the model jitted once per
  shape, NaN past each sequence's length (row t forecasts step t + 1)."""
  apply = jax.jit(lambda p, x, mask: model.apply({"params": p}, x, mask, fill_value=fill_value))

  def forecast(params, x, mask, lengths):
    pred = np.asarray(apply(params, x, mask))
    pred = np.where((np.arange(x.shape[1]) < lengths[:, None])[..., None], pred, np.nan)
    observed = mask[:, 1:]  # row t forecasts t + 1: score the next values that exist
    sq = np.where(observed, (pred[:, :-1] - np.where(mask, x, 0.0)[:, 1:]) ** 2, 0.0)
    return pred, (float(sq.sum() / observed.sum()) if observed.any() else None)

  return forecast
