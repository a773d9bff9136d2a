"""maskax.data.synthetic: deterministic generators whose documented rules hold exactly."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maskax.data import synthetic


def _seqs(seed=0, n=64, max_length=30, **kw):
  kw = {"blackout_prob": 0.5, **kw}
  return synthetic.drift_recall_sequences(
    np.random.default_rng(seed), n, max_length=max_length, **kw
  )


def test_generators_are_deterministic_in_the_seed():
  a, b, c = _seqs(1), _seqs(1), _seqs(2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["x"], c["x"])
  rgb = lambda s: synthetic.rgb_streams(np.random.default_rng(s), 4, 16)
  np.testing.assert_array_equal(rgb(0), rgb(0))
  mask = lambda s: synthetic.missing_mask(np.random.default_rng(s), 4, 16, rate=0.3, bursty=True)
  np.testing.assert_array_equal(mask(0), mask(0))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.integers(5, 40), st.floats(0.0, 1.0))
def test_drift_recall_rules(seed, max_length, trailing_share):
  s = _seqs(seed, n=16, max_length=max_length, trailing_share=trailing_share)
  x, labels, lengths = s["x"], s["labels"], s["lengths"]
  assert x.shape == (16, max_length, 4) and x.dtype == np.float32
  assert labels.dtype == np.int32 and lengths.dtype == np.int32
  assert np.all((lengths >= 5) & (lengths <= max_length))
  t = np.arange(max_length)[None]
  valid = t < lengths[:, None]
  assert np.all(x[~valid] == 0)
  # Per-step class at valid steps; after the length, the class of the last valid step.
  want = 2 * (x[:, :, 1] > 0) + (s["sign"][:, None] > 0)
  np.testing.assert_array_equal(labels[valid], want[valid])
  last = want[np.arange(16), lengths - 1]
  np.testing.assert_array_equal(np.where(valid, labels, last[:, None]), labels)
  # Real all-zero steps are exactly the blackouts, all inside the valid prefix.
  start, steps = s["blackout_start"][:, None], s["blackout_steps"][:, None]
  dark = (t >= start) & (t < start + steps)
  np.testing.assert_array_equal(np.all(x == 0, axis=-1) & valid, dark)
  assert np.all(valid[dark]) and np.all(s["blackout_steps"] <= 3)
  ends = s["blackout_start"] + s["blackout_steps"] == lengths
  if trailing_share == 0.0:
    assert not np.any(ends & (s["blackout_steps"] > 0))
  if trailing_share == 1.0:
    assert np.all(ends)


def test_drift_channel_carries_the_sign_and_bad_arguments_raise():
  s = _seqs(0, n=400, max_length=200, drift=0.5, blackout_prob=0.0)
  mean0 = s["x"][:, :, 0].sum(1) / s["lengths"]
  assert np.mean(np.sign(mean0) == s["sign"]) > 0.95
  with pytest.raises(ValueError, match="min_length"):
    _seqs(max_length=4)
  with pytest.raises(ValueError, match="blackout_max"):
    _seqs(blackout_max=5)
  with pytest.raises(ValueError, match="features"):
    _seqs(features=1)


def test_rgb_streams_are_smooth_between_cuts_and_jump_at_cuts():
  rng = lambda: np.random.default_rng(0)
  smooth = synthetic.rgb_streams(
    rng(), 32, 64, noise=0.0, cut_rate=0.0, wobble=0.3, periods=(6.0, 20.0)
  )
  assert smooth.shape == (32, 64, 3) and smooth.dtype == np.float32
  assert np.all((smooth >= 0) & (smooth <= 1))
  # |d/dt of the mean of two unit sinusoids| <= 2 pi / shortest period.
  assert np.abs(np.diff(smooth, axis=1)).max() <= 0.3 * 2 * np.pi / 6.0 + 1e-6
  cuts = synthetic.rgb_streams(rng(), 32, 64, noise=0.0, cut_rate=0.5)
  assert np.abs(np.diff(cuts, axis=1)).max() > 0.5
  assert np.any(smooth == 0.0)  # dark scenes clip to real zeros


@pytest.mark.parametrize("bursty", [False, True])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.6])
def test_missing_mask_rate_and_whole_steps(rate, bursty):
  mask = synthetic.missing_mask(
    np.random.default_rng(0), 400, 64, rate=rate, step_share=0.25, bursty=bursty
  )
  assert mask.shape == (400, 64, 3) and mask.dtype == bool
  assert abs((1 - mask.mean()) - rate) < 0.02
  whole = (~mask.any(-1)).mean()
  assert whole >= 0.25 * rate - 0.01
  if rate == 0.0:
    assert mask.all()


def test_iid_masks_nest_and_bursts_last():
  draw = lambda rate, **kw: synthetic.missing_mask(
    np.random.default_rng(5), 200, 64, rate=rate, **kw
  )
  lo, hi = draw(0.2), draw(0.6)
  assert np.all(hi <= lo)  # a higher rate hides a superset
  iid, burst = draw(0.4, step_share=0.0), draw(0.4, step_share=0.0, bursty=True, burst_steps=8.0)

  def mean_run(mask):
    m = ~mask.transpose(0, 2, 1).reshape(-1, 64)
    starts = m[:, 1:] & ~m[:, :-1]
    return m[:, 1:].sum() / max(starts.sum(), 1)

  assert mean_run(iid) < 2.0 and 6.0 < mean_run(burst) < 10.0


def test_missing_mask_per_row_rates_and_errors():
  rates = np.array([0.0, 0.6] * 100)
  mask = synthetic.missing_mask(np.random.default_rng(0), 200, 64, rate=rates)
  assert mask[rates == 0].all()
  assert abs((1 - mask[rates == 0.6].mean()) - 0.6) < 0.02
  with pytest.raises(ValueError, match="rate"):
    synthetic.missing_mask(np.random.default_rng(0), 2, 4, rate=1.0)
  with pytest.raises(ValueError, match="bursty mode cannot reach"):
    synthetic.missing_mask(
      np.random.default_rng(0), 2, 4, rate=0.9, step_share=0.0, bursty=True, burst_steps=2.0
    )


def test_missing_rgb_draws_what_the_generators_draw_with_its_settings():
  task = synthetic.MissingRGB(steps=10, noise=0.1, cut_rate=0.2, step_share=0.5, bursty=True)
  streams = lambda seed: synthetic.rgb_streams(
    np.random.default_rng(seed), 6, 10, noise=0.1, cut_rate=0.2
  )
  held = task.held_out(4, 6, (0.0, 0.3))
  np.testing.assert_array_equal(held[0.3]["truth"], streams([4, 0]))
  want = synthetic.missing_mask(
    np.random.default_rng([4, 1]), 6, 10, rate=0.3, step_share=0.5, bursty=True
  )
  np.testing.assert_array_equal(held[0.3]["mask"], want)
  np.testing.assert_array_equal(np.isnan(held[0.3]["x"]), ~want)
  assert held[0.0]["mask"].all()
  mean = streams([7, 0]).reshape(-1, 3).mean(axis=0)
  np.testing.assert_allclose(task.fill_mean(7, n=6), mean, rtol=1e-6)
  batch = task.batch_fn((0.0, 0.5))(np.random.default_rng(0), 40)
  np.testing.assert_array_equal(np.isnan(batch["x"]), ~batch["mask"])
  assert batch["mask"].all(axis=(1, 2)).any() and not batch["mask"].all()  # rates mix per row
