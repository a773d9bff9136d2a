"""maskax.models.timeseries and experiments/feature_mask.py: the inputs never read a missing
value, strategies agree on fully observed streams, the loss ignores unobserved targets, a
fully missing step freezes the carry, and `smoke` trains, checkpoints and resumes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import launch_here, resume_to_six
from experiments import feature_mask as fm
from maskax.models import timeseries

B, T, F = 3, 8, 3
FILL = np.array([0.5, 0.25, 0.75], np.float32)
SMOKE = "--config=experiments/feature_mask.py:smoke"


def _data(seed=0, rate=0.4):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(B, T, F)).astype(np.float32)
  mask = rng.uniform(size=(B, T, F)) >= rate
  mask[1, 3] = False  # a whole step missing
  return x, mask


def _forward_fill_ref(x, mask, fill):
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    last = fill.copy()
    for t in range(x.shape[1]):
      last = np.where(mask[b, t], x[b, t], last)
      out[b, t] = last
  return out


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.0, 0.9))
def test_forward_fill_matches_a_loop(seed, rate):
  x, mask = _data(seed, rate)
  got = timeseries.forward_fill(np.where(mask, x, np.nan), mask, fill_value=FILL)
  np.testing.assert_array_equal(got, _forward_fill_ref(x, mask, FILL))


@pytest.mark.parametrize("strategy", timeseries.STRATEGIES)
def test_inputs_never_read_missing_values(strategy):
  x, mask = _data()
  build = lambda x: timeseries.build_inputs(x, mask, strategy=strategy, fill_value=FILL)
  clean = build(x)
  for garbage in (np.nan, np.inf, -1e6):
    np.testing.assert_array_equal(build(np.where(mask, x, garbage)), clean)
  grad = jax.grad(lambda x: jnp.sum(build(x) ** 2))(jnp.where(mask, x, jnp.nan))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)


def test_fully_observed_inputs_agree_except_indicator_columns():
  x, _ = _data()
  full = np.ones(x.shape, bool)
  inputs = {
    s: np.asarray(timeseries.build_inputs(x, full, strategy=s, fill_value=FILL))
    for s in timeseries.STRATEGIES
  }
  assert inputs["zero_fill"].shape == (B, T, F)
  np.testing.assert_array_equal(inputs["zero_fill"], x)
  for s in ("indicator", "forward_fill", "mean_fill"):
    assert inputs[s].shape == (B, T, 2 * F)
    np.testing.assert_array_equal(inputs[s][..., :F], x)
    np.testing.assert_array_equal(inputs[s][..., F:], 1.0)


def test_each_strategy_fills_missing_entries_as_documented():
  x, mask = _data()
  get = lambda s: np.asarray(timeseries.build_inputs(x, mask, strategy=s, fill_value=FILL))
  np.testing.assert_array_equal(get("zero_fill"), np.where(mask, x, 0.0))
  np.testing.assert_array_equal(get("indicator")[..., :F], np.where(mask, x, 0.0))
  np.testing.assert_array_equal(get("mean_fill")[..., :F], np.where(mask, x, FILL))
  np.testing.assert_array_equal(get("forward_fill")[..., :F], _forward_fill_ref(x, mask, FILL))
  np.testing.assert_array_equal(get("indicator")[..., F:], mask.astype(np.float32))
  jitted = jax.jit(timeseries.build_inputs, static_argnames="strategy")
  for s in timeseries.STRATEGIES:
    np.testing.assert_array_equal(jitted(x, mask, strategy=s, fill_value=FILL), get(s))
  with pytest.raises(ValueError, match="strategy='median'"):
    timeseries.build_inputs(x, mask, strategy="median")
  with pytest.raises(ValueError, match="fmask must be bool"):
    timeseries.build_inputs(x, mask.astype(np.float32), strategy="indicator")
  with pytest.raises(ValueError, match="fill_value must be"):
    timeseries.build_inputs(x, mask, strategy="mean_fill", fill_value=FILL[:2])


@pytest.fixture(scope="module")
def lstm_setup():
  model = timeseries.FeatureMaskRNN(cell="lstm", hidden=8, strategy="indicator")
  x, mask = _data(1)
  params = model.init(jax.random.key(0), x, mask, fill_value=FILL)["params"]
  return model, params


def test_loss_ignores_unobserved_targets(lstm_setup):
  model, params = lstm_setup
  x, mask = _data(2)
  loss = jax.jit(
    lambda p, b: timeseries.make_loss(model, jnp.asarray(FILL))(p, {}, b, None, train=True)[0][
      "mse"
    ]
  )
  value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b)[0] / loss(p, b)[1]))
  base = {"x": np.where(mask, x, np.nan).astype(np.float32), "mask": mask}
  (total, weight), (v, g) = loss(params, base), value_and_grad(params, base)
  pred = model.apply({"params": params}, x, mask, fill_value=FILL)
  err = np.square(np.asarray(pred, np.float64)[:, :-1] - x[:, 1:])
  np.testing.assert_allclose(total, err[mask[:, 1:]].sum(), rtol=1e-5)
  assert float(weight) == mask[:, 1:].sum()
  for garbage in (0.0, 7.0, -np.inf):
    other = dict(base, x=np.where(mask, x, garbage).astype(np.float32))
    v2, g2 = value_and_grad(params, other)
    assert float(v2) == float(v)
    jax.tree.map(np.testing.assert_array_equal, g2, g)


def test_a_fully_missing_step_freezes_the_carry(lstm_setup):
  model, params = lstm_setup
  x, mask = _data(3, rate=0.0)
  mask[:, 4] = False
  pred = np.asarray(model.apply({"params": params}, x, mask, fill_value=FILL))
  np.testing.assert_array_equal(pred[:, 4], pred[:, 3])  # carry unchanged, forecast repeated
  # Dropping the missing step from the sequence gives the same forecasts after it.
  keep = np.arange(T) != 4
  short = np.asarray(model.apply({"params": params}, x[:, keep], mask[:, keep], fill_value=FILL))
  np.testing.assert_allclose(pred[:, keep], short, atol=1e-6)


def test_baseline_and_next_step_mse():
  x, mask = _data(4)
  forecast = timeseries.last_value_forecast(x, mask, fill_value=FILL)
  (obs_t, obs_w), (full_t, full_w) = timeseries.next_step_mse(forecast, x, mask)
  err = np.square(_forward_fill_ref(x, mask, FILL)[:, :-1] - x[:, 1:].astype(np.float64))
  np.testing.assert_allclose(obs_t, err[mask[:, 1:]].sum(), rtol=1e-5)
  np.testing.assert_allclose(full_t, err.sum(), rtol=1e-5)
  assert float(obs_w) == mask[:, 1:].sum() and float(full_w) == B * (T - 1) * F


def test_eval_sums_skip_filler_rows_and_score_the_baseline(lstm_setup):
  model, params = lstm_setup
  x, mask = _data(5)
  batch = {
    "x": np.where(mask, x, np.nan).astype(np.float32),
    "mask": mask,
    "truth": x,
    "valid": np.array([True, True, False]),
  }  # row 2 is filler: it must count nowhere
  sums = jax.jit(timeseries.make_eval_sums(model, jnp.asarray(FILL)))(params, {}, batch, None)
  pred = model.apply({"params": params}, x[:2], mask[:2], fill_value=FILL)
  (obs_t, obs_w), (full_t, full_w) = timeseries.next_step_mse(pred, x[:2], mask[:2])
  base = timeseries.last_value_forecast(x[:2], mask[:2], fill_value=FILL)
  want = {
    "mse": (obs_t, obs_w),
    "full_mse": (full_t, full_w),
    "last_value_mse": timeseries.next_step_mse(base, x[:2], mask[:2])[0],
  }
  for name, (total, weight) in want.items():
    np.testing.assert_allclose(sums[name][0], total, rtol=1e-5, err_msg=name)
    assert float(sums[name][1]) == float(weight), name


def test_eval_data_masks_the_same_streams_at_every_rate():
  config = fm.get_config("smoke")
  sets = fm.make_data(config)[1]
  assert list(sets) == ["miss0", "miss20", "miss40", "miss60"]
  truth = np.concatenate([b["truth"] for b in sets["miss0"]])
  for batches in sets.values():
    x = np.concatenate([b["x"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["truth"] for b in batches]), truth)
    np.testing.assert_array_equal(np.isnan(x), ~mask)
  missing = [1.0 - np.concatenate([b["mask"] for b in sets[k]]).mean() for k in sets]
  assert missing[0] == 0.0 and missing == sorted(missing) and missing[-1] > 0.45


def test_training_batches_hide_missing_values_and_mix_rates():
  config = fm.get_config("smoke")
  config.data.steps, config.train.batch_size = 32, 64
  batch = next(fm.make_data(config)[0])
  assert batch["x"].shape == (64, 32, 3) and batch["mask"].dtype == bool
  np.testing.assert_array_equal(np.isnan(batch["x"]), ~batch["mask"])
  missing = 1.0 - batch["mask"].mean(axis=(1, 2))
  assert missing.min() == 0.0 and missing.max() > 0.45  # rates 0 .. 0.6 per sequence
  config.model.strategy = "bogus"
  with pytest.raises(ValueError, match="model.strategy='bogus'"):
    fm.make_model(config)


@pytest.mark.slow
def test_smoke_trains_checkpoints_resumes(tmp_path):
  work = str(tmp_path / "w")
  first = launch_here(SMOKE, f"--workdir={work}", check=True)
  assert "eval/mse_miss60" in first.stdout and "eval/last_value_mse_miss0" in first.stdout
  assert os.path.isdir(os.path.join(work, "checkpoints", "4"))
  records = resume_to_six((SMOKE, f"--workdir={work}"), work)
  final = [r for r in records if "eval/mse_miss0" in r][-1]
  assert all(np.isfinite(final[m]) for m in fm.REPORT_METRICS)


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("feature_mask_trained"))
  config = fm.get_config("smoke")
  fm.run(config, workdir)
  return config, workdir


def test_predict_forecasts_npz_and_csv_alike(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  x, mask = _data(seed=3)
  np.savez(tmp_path / "nan.npz", values=np.where(mask, x, np.nan), mask=mask)
  np.savez(tmp_path / "junk.npz", values=np.where(mask, x, 1e6), mask=mask)
  # The .csv layout (maskax.data.user_files): empty cells are missing; row 2 stops at step 5.
  lines = ["sequence,r,g,b"] + [
    f"s{b}," + ",".join(repr(float(v)) if m else "" for v, m in zip(x[b, t], mask[b, t]))
    for b in range(B)
    for t in range(T if b < 2 else 5)
  ]
  (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
  inputs = [str(tmp_path / n) for n in ("nan.npz", "junk.npz", "rows.csv")]
  out = fm.predict(config, workdir, inputs, out_dir=str(tmp_path / "out"))
  nan, junk, rows = [np.load(o["output"])["forecast"] for o in out]
  assert nan.shape == (B, T, F) and np.all(np.isfinite(nan))
  np.testing.assert_array_equal(junk, nan)  # values at missing entries are never read
  np.testing.assert_allclose(rows[:2], nan[:2], atol=1e-6)
  np.testing.assert_allclose(rows[2, :5], nan[2, :5], atol=1e-6)
  assert np.all(np.isnan(rows[2, 5:]))  # past the sequence's length
  observed = mask[:, 1:]  # row t forecasts step t + 1
  want = np.mean((nan[:, :-1] - x[:, 1:])[observed] ** 2)
  assert out[0]["next_step_mse"] == pytest.approx(want, rel=1e-5)
  assert out[0]["observed_fraction"] == pytest.approx(mask.mean())
  assert (out[0]["rows"], out[0]["steps"], out[2]["steps"]) == (B, T, T)


def test_predict_input_errors_are_one_line(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  run = lambda name: fm.predict(
    config, workdir, [str(tmp_path / name)], out_dir=str(tmp_path / "out")
  )
  x, mask = _data()
  cases = {
    "nomask.npz": (
      dict(values=x),
      r"no array mask \(it has values\); expected values "
      r"f32\[B, T, 3\] and mask bool\[B, T, 3\]",
    ),
    "intmask.npz": (
      dict(values=x, mask=mask.astype(np.int64)),
      r"mask is int64\[3, 8, 3\]; expected bool\[3, 8, 3\]",
    ),
    "rgba.npz": (
      dict(values=np.zeros((B, T, 4)), mask=np.ones((B, T, 4), bool)),
      r"values has shape \[3, 8, 4\]; expected values f32\[B, T, 3\]",
    ),
    "observed_nan.npz": (
      dict(values=x + np.nan, mask=mask),
      r"an observed value \(mask True\) is NaN or infinite",
    ),
  }
  for name, (arrays, message) in cases.items():
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(ValueError, match=f"{name}: {message}"):
      run(name)
  (tmp_path / "word.csv").write_text("s,r,g,b\ns,0.5,red,0.1\n")
  with pytest.raises(ValueError, match="word.csv:2: a feature value is not a number"):
    run("word.csv")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    fm.predict(config, str(tmp_path), [str(tmp_path / "word.csv")], out_dir=str(tmp_path))
