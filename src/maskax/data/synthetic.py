"""Deterministic synthetic sequences for the masking experiments, drawn from an explicit rng.

Every generator takes a `np.random.Generator` (the iterators pass `default_rng([seed, i])` for
batch i), so the same seed gives the same arrays on every machine and process.

- `drift_recall_sequences` (experiments/padded_gru.py): variable-length 4-channel signals whose
  class needs the *whole* valid sequence (the sign of a weak drift in channel 0) and its *last*
  valid step (the sign of channel 1 there), with optional real all-zero steps ("blackouts").
- `rgb_streams` and `missing_mask` (experiments/feature_mask.py): smooth RGB trajectories with
  noise and scene cuts, and validity masks with channels missing at random or in bursts and
  some whole steps missing; `MissingRGB` holds one task's settings of both and draws the
  training batches, the held-out sets and the fill mean from them.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def drift_recall_sequences(
  rng: np.random.Generator,
  n: int,
  *,
  max_length: int,
  min_length: int = 5,
  features: int = 4,
  drift: float = 0.2,
  blackout_prob: float = 0.0,
  blackout_max: int = 3,
  trailing_share: float = 0.5,
) -> dict[str, np.ndarray]:
  """Signals whose class depends on the whole valid prefix and on its last step.

  Each sequence has a hidden sign s = +-1. Channel 0 is N(s * drift, 1) noise (the evidence for
  s accumulates over the whole sequence; the Bayes decision is sign(sum of channel 0)), channel
  1 is N(0, 1) (its sign at the last valid step must be recalled through any padding), the rest
  are N(0, 1) distractors. The per-step class is 2 * [x1[t] > 0] + [s > 0] (C = 4); after the
  length it repeats the class of the last valid step (the answer for the sequence).
  With probability `blackout_prob` a sequence holds a blackout: 1..blackout_max consecutive
  *real* all-zero steps, ending the sequence with probability `trailing_share`, else inside it.
  That is exactly where Keras' `Masking(0.)` rule (maskax.masking.masks.mask_from_value) goes wrong.

  Returns x f32[n, max_length, F] (0 at and after the length), labels i32[n, max_length],
  lengths i32[n] in [min_length, max_length], sign i32[n] (+-1), blackout_start i32[n] and
  blackout_steps i32[n] (0 = no blackout).
  """
  if not 1 <= min_length <= max_length:
    raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}.")
  if features < 2:
    raise ValueError(f"features={features}: need at least 2 (drift and recall channels).")
  if blackout_max >= min_length:
    raise ValueError(
      f"blackout_max={blackout_max} must be below min_length={min_length} so a"
      " blackout never covers a whole sequence."
    )
  lengths = rng.integers(min_length, max_length + 1, size=n)
  sign = np.where(rng.random(n) < 0.5, 1, -1)
  x = rng.normal(size=(n, max_length, features))
  x[:, :, 0] += drift * sign[:, None]
  has = rng.random(n) < blackout_prob
  steps = np.where(has, rng.integers(1, blackout_max + 1, size=n), 0)
  trailing = rng.random(n) < trailing_share
  inner = (rng.random(n) * (lengths - steps)).astype(np.int64)  # start in [0, length - steps)
  start = np.where(trailing, lengths - steps, inner)
  t = np.arange(max_length)[None, :]
  valid = t < lengths[:, None]
  dark = (t >= start[:, None]) & (t < (start + steps)[:, None])
  x = np.where((valid & ~dark)[..., None], x, 0.0).astype(np.float32)
  per_step = 2 * (x[:, :, 1] > 0) + (sign[:, None] > 0)
  last = np.take_along_axis(per_step, (lengths - 1)[:, None], axis=1)
  labels = np.where(valid, per_step, last).astype(np.int32)
  return {
    "x": x,
    "labels": labels,
    "lengths": lengths.astype(np.int32),
    "sign": sign.astype(np.int32),
    "blackout_start": start.astype(np.int32),
    "blackout_steps": steps.astype(np.int32),
  }


def rgb_streams(
  rng: np.random.Generator,
  n: int,
  steps: int,
  *,
  noise: float = 0.05,
  cut_rate: float = 0.01,
  wobble: float = 0.3,
  periods: tuple[float, float] = (6.0, 20.0),
) -> np.ndarray:
  """Pixel colour over time: smooth trajectories with sensor noise and scene cuts.

  Within a scene each channel follows base + wobble * (sum of two sinusoids with periods drawn
  from `periods`, random phases); the base colour is uniform in [0, 1]^3. At each step a cut
  (new base, new sinusoids) happens with probability `cut_rate`: an unpredictable jump.
  Gaussian noise of std `noise` is added and values are clipped to [0, 1], so dark scenes hold
  real zeros (a zero-filled missing value then looks like a black pixel).

  Returns f32[n, T, 3].
  """
  if steps < 1 or n < 0:
    raise ValueError(f"need steps >= 1 and n >= 0, got steps={steps}, n={n}.")
  cuts = rng.random((n, steps)) < cut_rate
  cuts[:, 0] = False
  scene = np.cumsum(cuts, axis=1)  # i32[n, T]: scene index of every step
  base = rng.random((n, steps, 3))
  freq = 2 * np.pi / rng.uniform(*periods, size=(n, steps, 2, 3))
  phase = rng.uniform(0, 2 * np.pi, size=(n, steps, 2, 3))
  pick = lambda a: np.take_along_axis(a, scene.reshape(scene.shape + (1,) * (a.ndim - 2)), axis=1)
  t = np.arange(steps, dtype=np.float64).reshape(1, steps, 1, 1)
  wave = np.sin(pick(freq) * t + pick(phase)).sum(axis=2) / 2.0
  x = pick(base) + wobble * wave + noise * rng.normal(size=(n, steps, 3))
  return np.clip(x, 0.0, 1.0).astype(np.float32)


def missing_mask(
  rng: np.random.Generator,
  n: int,
  steps: int,
  channels: int = 3,
  *,
  rate,
  step_share: float = 0.25,
  bursty: bool = False,
  burst_steps: float = 8.0,
) -> np.ndarray:
  """Validity mask with about `rate` of the entries missing (True = observed).

  rate: a float, or f64[n] (one rate per sequence), each in [0, 1). A whole step is missing
  with probability r_s = step_share * rate; otherwise each channel is missing with probability
  r_c = 1 - (1 - rate) / (1 - r_s), so the expected missing fraction of entries is exactly
  `rate`. Missing channels are independent per step, or, with `bursty`, a two-state Markov
  chain per channel whose missing stretches last `burst_steps` steps on average (stationary
  missing probability r_c; the chain starts in its stationary law). In the iid mode the draws
  do not depend on `rate`, so masks at a higher rate from the same rng state hide a superset
  of the entries (nested).

  Returns bool[n, T, C].
  """
  rate = np.broadcast_to(np.asarray(rate, np.float64), (n,))
  if np.any((rate < 0.0) | (rate >= 1.0)):
    raise ValueError(f"rate must lie in [0, 1), got {rate.min()}..{rate.max()}.")
  if not 0.0 <= step_share <= 1.0:
    raise ValueError(f"step_share={step_share} must lie in [0, 1].")
  r_step = step_share * rate
  r_chan = (1.0 - (1.0 - rate) / (1.0 - r_step))[:, None, None]  # f64[n, 1, 1]
  step_ok = rng.random((n, steps)) >= r_step[:, None]
  if not bursty:
    chan_ok = rng.random((n, steps, channels)) >= r_chan
    return chan_ok & step_ok[..., None]
  if burst_steps < 1.0:
    raise ValueError(f"burst_steps={burst_steps} must be >= 1 (mean length of a dropout).")
  p_return = 1.0 / burst_steps  # missing -> observed
  p_drop = r_chan * p_return / (1.0 - r_chan)  # balances the two flows: stationary law r_c
  if np.any(p_drop > 1.0):
    raise ValueError(
      f"bursty mode cannot reach rate={rate.max()} with burst_steps="
      f"{burst_steps}; lower burst_steps or the rate."
    )
  u = rng.random((n, steps, channels))
  missing = np.empty((n, steps, channels), bool)
  missing[:, 0] = u[:, 0] < r_chan[:, 0]
  for t in range(1, steps):
    stay_missing = missing[:, t - 1] & (u[:, t] >= p_return)
    start_missing = ~missing[:, t - 1] & (u[:, t] < p_drop[:, 0])
    missing[:, t] = stay_missing | start_missing
  return ~missing & step_ok[..., None]


def pad_sequences(seqs: dict, steps: int) -> dict:
  """Crops or zero-pads `drift_recall_sequences` output to `steps`: x f32[n, T0, F] with zeros,
  labels i32[n, T0] by repeating the last label (padded steps keep the sequence's class).
  Returns {x, labels, lengths}."""
  x, labels = seqs["x"][:, :steps], seqs["labels"][:, :steps]
  extra = steps - x.shape[1]
  if extra > 0:
    x = np.pad(x, ((0, 0), (0, extra), (0, 0)))
    labels = np.pad(labels, ((0, 0), (0, extra)), mode="edge")
  return {"x": x, "labels": labels, "lengths": seqs["lengths"]}


@dataclasses.dataclass(frozen=True)
class MissingRGB:
  """RGB streams (`rgb_streams`) with entries missing (`missing_mask`): one task's settings.

  Missing entries hold NaN in what it returns: a model must never read them.
  """

  steps: int  # T
  noise: float = 0.05
  cut_rate: float = 0.01
  wobble: float = 0.3
  periods: tuple[float, float] = (6.0, 20.0)
  step_share: float = 0.25
  bursty: bool = False
  burst_steps: float = 8.0

  def streams(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """The fully observed values f32[n, T, 3]."""
    return rgb_streams(
      rng,
      n,
      self.steps,
      noise=self.noise,
      cut_rate=self.cut_rate,
      wobble=self.wobble,
      periods=tuple(self.periods),
    )

  def mask(self, rng: np.random.Generator, n: int, rate) -> np.ndarray:
    """bool[n, T, 3], True = observed; `rate` a float or f64[n]."""
    return missing_mask(
      rng,
      n,
      self.steps,
      rate=rate,
      step_share=self.step_share,
      bursty=self.bursty,
      burst_steps=self.burst_steps,
    )

  def batch_fn(self, rates):
    """`(rng, n) -> {x f32[n, T, 3] (NaN where missing), mask bool[n, T, 3]}` for
    `maskax.data.iterators.SyntheticBatches`: each sequence draws its rate from `rates`."""
    rates = np.asarray(rates, np.float64)

    def make(rng, n):
      x = self.streams(rng, n)
      mask = self.mask(rng, n, rates[rng.integers(0, len(rates), size=n)])
      return {"x": np.where(mask, x, np.nan).astype(np.float32), "mask": mask}

    return make

  def held_out(self, seed: int, n: int, rates) -> dict[float, dict[str, np.ndarray]]:
    """`{rate: {x, mask, truth}}`: the same `n` streams (`truth`, fully observed) masked at
    each rate; iid masks are nested across rates (`missing_mask`)."""
    truth = self.streams(np.random.default_rng([seed, 0]), n)
    out = {}
    for rate in rates:
      mask = self.mask(np.random.default_rng([seed, 1]), n, rate)
      out[rate] = {"x": np.where(mask, truth, np.nan).astype(np.float32), "mask": mask}
      out[rate]["truth"] = truth
    return out

  def fill_mean(self, seed: int, n: int = 256) -> np.ndarray:
    """Per-channel mean f32[3] of `n` streams drawn aside (mean_fill, GRU-D). Entries go
    missing independently of their values, so this equals the mean of the observed values in
    expectation."""
    x = self.streams(np.random.default_rng([seed, 0]), n)
    return x.reshape(-1, 3).mean(axis=0).astype(np.float32)
