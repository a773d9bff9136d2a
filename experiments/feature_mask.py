"""Masking features instead of timesteps: which input for RGB streams with missing channels?

A GRU (or LSTM) forecasts the full RGB of a pixel at t+1 from its past, where channels go
missing at random per step (or, with data.bursty, drop out for stretches) and some whole steps
are missing: `maskax.data.synthetic.rgb_streams` (smooth trajectories, noise, scene cuts,
values clipped to [0, 1] so real blacks exist) and `missing_mask`. Missing entries hold NaN in
the batches: the model must never read them. One key, `model.strategy`, picks the input
(`maskax.models.timeseries`): indicator (zeroed values + mask), zero_fill (no mask),
forward_fill (last observed value + mask), mean_fill (training mean + mask). A step with
nothing observed freezes the carry. The loss is masked MSE over observed target channels.

The ablation is strategy x missing rate. Decision: one run per strategy, trained on a mix of
rates (each training sequence draws its rate from data.train_rates), evaluated on the same
held-out streams at every rate in data.eval_rates. So the rate is an eval axis, not a sweep
key: 4 runs instead of 16, and every rate is scored by the same weights. Reported per rate r
(in %): eval/mse_miss{r} (observed targets), eval/full_mse_miss{r} (every target: the fully
observed ground truth) and eval/last_value_mse_miss{r} (naive baseline: last observed value).

  python launch.py --config=experiments/feature_mask.py --workdir=runs/feature_mask
  python launch.py --config=experiments/feature_mask.py --workdir=runs/feature_mask_ablation \
      --sweep=model.strategy=indicator,zero_fill,forward_fill,mean_fill
  echo rgb.npz | python launch.py --config=experiments/feature_mask.py --workdir=runs/feature_mask \
      --predict=-          # forecast values + mask[B, T, 3] (or a .csv): predictions/rgb_pred.npz
Hardware: CPU. Default (T = 64, batch 32, 1500 steps): about 15 s of CPU time, 45 s wall per
strategy on a shared 2-core CPU; the 4-strategy sweep 3 min. Expected (measured, 256 held-out
streams): at 60% missing, observed-target MSE 0.0277 (indicator), 0.0278 (forward_fill),
0.0279 (mean_fill), 0.0354 (zero_fill), against 0.0329 for the last-value baseline.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.masking import losses
from maskax.training import evaluation, restore, train
from maskax.data import iterators, synthetic, user_files
from maskax.models import timeseries

PRESETS = {
  "default": "GRU(32), T=64 RGB streams, rates 0-60% mixed, batch 32, 1500 steps (~45 s)",
  "smoke": "GRU(8), T=12, 4 steps, checkpoint every 2 (seconds; for tests)",
}
_RATES = (0.0, 0.2, 0.4, 0.6)
REPORT_METRICS = tuple(
  f"eval/{name}_miss{round(100 * r)}"
  for name in ("mse", "full_mse", "last_value_mse")
  for r in _RATES
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; presets: {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # init and training batches
  c.data = ml_collections.ConfigDict()
  c.data.seed = 0  # held-out streams (data.seed + 1) and the fill mean (+ 2): the same for
  # every training seed
  c.data.steps = 64  # T
  c.data.noise = 0.05  # sensor noise std (alone it puts a floor of 0.0025 on the MSE)
  c.data.cut_rate = 0.01  # scene cuts per step: unpredictable jumps (~0.0017 more MSE)
  c.data.wobble = 0.3  # amplitude of the smooth colour drift within a scene
  c.data.periods = (6.0, 20.0)  # range of the drift's sinusoid periods, in steps
  c.data.train_rates = _RATES  # each training sequence draws its missing rate from these
  c.data.eval_rates = _RATES  # held-out MSE at each (names: eval/mse_miss{100 r})
  c.data.step_share = 0.25  # share of the missing rate taken by whole missing steps
  c.data.bursty = False  # channels drop out for stretches instead of independently
  c.data.burst_steps = 8.0  # bursty: mean length of a dropout
  c.data.eval_size = 256  # held-out streams
  c.data.eval_batch_size = 64
  c.model = ml_collections.ConfigDict()
  c.model.strategy = "indicator"  # indicator | zero_fill | forward_fill | mean_fill
  c.model.cell = "gru"  # gru | lstm
  c.model.hidden = 32  # D
  c.model.freeze_missing_steps = True  # a step with nothing observed leaves the carry unchanged
  c.train = common.train_config()  # + the loop's shared defaults (experiments/common.py)
  c.train.steps = 1500
  c.train.batch_size = 32
  c.train.learning_rate = 3e-3  # Adam
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  if arg == "smoke":
    c.data.steps = 12
    c.data.eval_size = 16
    c.data.eval_batch_size = 8
    c.model.hidden = 8
    common.smoke_loop(c.train)
  return c


def build_model(config) -> timeseries.FeatureMaskRNN:
  m = config.model
  if m.strategy not in timeseries.STRATEGIES:
    raise ValueError(
      f"model.strategy={m.strategy!r}: use one of {', '.join(timeseries.STRATEGIES)}."
    )
  return timeseries.FeatureMaskRNN(
    cell=m.cell, hidden=m.hidden, strategy=m.strategy, freeze_missing_steps=m.freeze_missing_steps
  )


def _streams(config, rng, n):
  d = config.data
  return synthetic.rgb_streams(
    rng, n, d.steps, noise=d.noise, cut_rate=d.cut_rate, wobble=d.wobble, periods=tuple(d.periods)
  )


def _mask(config, rng, n, rate):
  d = config.data
  return synthetic.missing_mask(
    rng, n, d.steps, rate=rate, step_share=d.step_share, bursty=d.bursty, burst_steps=d.burst_steps
  )


def make_batch_fn(config):
  """`(rng, n) -> {x f32[n, T, 3] (NaN where missing), mask bool[n, T, 3]}`."""
  rates = np.asarray(config.data.train_rates, np.float64)

  def make(rng, n):
    x = _streams(config, rng, n)
    mask = _mask(config, rng, n, rates[rng.integers(0, len(rates), size=n)])
    return {"x": np.where(mask, x, np.nan).astype(np.float32), "mask": mask}

  return make


def fill_mean(config) -> np.ndarray:
  """Per-channel mean of held-aside training streams: f32[3] (mean_fill, GRU-D).

  Entries go missing independently of their values, so this equals the mean of the observed
  values in expectation.
  """
  x = _streams(config, np.random.default_rng([config.data.seed + 2, 0]), 256)
  return x.reshape(-1, 3).mean(axis=0).astype(np.float32)


def make_loss(model, fill_value):
  """Task loss: masked MSE of the t+1 forecast over observed target channels (token mean)."""

  def loss(params, model_state, batch, key, *, train):
    del key, train
    pred = model.apply({"params": params}, batch["x"], batch["mask"], fill_value=fill_value)
    observed, _ = timeseries.next_step_mse(pred, batch["x"], batch["mask"])
    return {"mse": observed}, {}, model_state

  return loss


def eval_data(config) -> dict[str, list[dict]]:
  """`{miss<100 r>: batches}` for every r in data.eval_rates: the same held-out streams, masked
  at each rate (iid masks are nested across rates); `truth` holds the fully observed values."""
  d = config.data
  truth = _streams(config, np.random.default_rng([d.seed + 1, 0]), d.eval_size)
  sets = {}
  for rate in d.eval_rates:
    mask = _mask(config, np.random.default_rng([d.seed + 1, 1]), d.eval_size, rate)
    x = np.where(mask, truth, np.nan).astype(np.float32)
    arrays = {"x": x, "mask": mask, "truth": truth}
    sets[f"miss{round(100 * rate)}"] = evaluation.fixed_batches(arrays, d.eval_batch_size)
  return sets


def make_eval_sums(model, fill_value):
  """Held-out MSE of the t+1 forecast over observed targets (`mse`), over every target against
  the ground truth (`full_mse`), and of the last observed value (`last_value_mse`)."""

  def eval_sums(params, model_state, batch, key):
    del model_state, key
    x, mask, rows = batch["x"], batch["mask"], batch["valid"][:, None, None]

    def mse(pred, y, counted):  # row t forecasts t + 1; filler rows (valid False) count nowhere
      return losses.masked_mse(pred[:, :-1], y[:, 1:], (counted & rows)[:, 1:])

    pred = model.apply({"params": params}, x, mask, fill_value=fill_value)
    last = timeseries.last_value_forecast(x, mask, fill_value=fill_value)
    return {
      "mse": mse(pred, x, mask),
      "full_mse": mse(pred, batch["truth"], jnp.ones_like(mask)),
      "last_value_mse": mse(last, x, mask),
    }

  return eval_sums


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  model = build_model(config)
  fill_value = jnp.asarray(fill_mean(config))
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_data = iterators.SyntheticBatches(
    make_batch_fn(config), config.train.batch_size, config.seed, **proc
  )

  def init(key):
    x = jnp.zeros((1, config.data.steps, 3), jnp.float32)
    return model.init(key, x, jnp.ones(x.shape, jnp.bool_), fill_value=fill_value)["params"], {}

  sets = eval_data(config)
  task = train.Task(
    init=init,
    loss=make_loss(model, fill_value),
    optimizer=optax.adam(config.train.learning_rate),
    train_data=train_data,
    eval_data=lambda: sets,
    eval_sums=make_eval_sums(model, fill_value),
  )
  _, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  return final


def predict(config, workdir: str, lines: list[str], *, out_dir: str = "predictions") -> list[dict]:
  """Forecasts the next RGB value of streams with missing entries: each line a .npz (values
  f32[B, T, 3], mask bool[B, T, 3]) or .csv file (an empty cell is missing; layouts:
  `maskax.data.user_files`) or a folder of them.

  Writes <out_dir>/<name>_pred.npz with forecast f32[B, T, 3] (row t: step t + 1 predicted from
  steps <= t; NaN past each sequence's length); one {"input", "output", "rows", "steps",
  "observed_fraction", "next_step_mse"} per file, the MSE over the observed next values (null
  when none is observed).
  """
  params = restore.restore_params(workdir).params
  model = build_model(config)
  fill_value = jnp.asarray(fill_mean(config))
  paths = user_files.expand_paths(lines, user_files.SEQUENCE_EXTENSIONS, what="sequence")
  stems = user_files.output_stems(paths)
  files = [user_files.read_masked(p, features=3) for p in paths]  # the model's RGB channels
  forecast = jax.jit(lambda p, x, mask: model.apply({"params": p}, x, mask, fill_value=fill_value))
  os.makedirs(out_dir, exist_ok=True)
  out = []
  for path, stem, f in zip(paths, stems, files):
    x, mask, lengths = f["values"], f["mask"], f["lengths"]
    pred = np.asarray(forecast(params, x, mask))
    pred = np.where((np.arange(x.shape[1]) < lengths[:, None])[..., None], pred, np.nan)
    observed = mask[:, 1:]  # row t forecasts t + 1: score the next values that exist
    sq = np.where(observed, (pred[:, :-1] - np.where(mask, x, 0.0)[:, 1:]) ** 2, 0.0)
    output = user_files.write_npz(os.path.join(out_dir, f"{stem}_pred.npz"), forecast=pred)
    out.append(
      {
        "input": path,
        "output": output,
        "rows": x.shape[0],
        "steps": x.shape[1],
        "observed_fraction": float(mask.mean()),
        "next_step_mse": float(sq.sum() / observed.sum()) if observed.any() else None,
      }
    )
  return out
