"""maskax.training.evaluation: sums over batches and devices, Max, finish, named sets, the loop's wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskax.masking import losses, metrics
from maskax.training import evaluation, sharding, train

C, N, B = 4, 13, 8  # 13 rows in batches of 8: the last batch holds 3 filler rows


def _arrays(seed=0):
  """Predictions and labels of N images of 2x3 pixels (255 = ignore), plus a value per row."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, size=(N, 2, 3))
  labels[rng.uniform(size=labels.shape) < 0.2] = metrics.IGNORE_LABEL
  return {
    "pred": rng.integers(0, C, size=(N, 2, 3)).astype(np.int32),
    "label": labels.astype(np.int32),
    "value": rng.normal(size=(N,)).astype(np.float32),
  }


def _sums(params, batch):
  """A pair, a Max and a confusion matrix i32[C, C]; filler rows (valid False) count nowhere."""
  valid = batch["valid"]
  labels = jnp.where(valid[:, None, None], batch["label"], metrics.IGNORE_LABEL)
  value = batch["value"] * params["scale"]
  return {
    "mean": (jnp.sum(jnp.where(valid, value, 0.0)), jnp.sum(valid, dtype=jnp.float32)),
    "worst": evaluation.Max(jnp.max(jnp.abs(value))),
    "confusion": metrics.confusion_matrix(batch["pred"], labels, C),
  }


def _finish(sums):
  return {
    **metrics.segmentation_scores(sums["confusion"]),
    "labelled": float(np.sum(sums["confusion"])),
  }


def _evaluate(devices, data, finish=_finish):
  mesh = sharding.make_mesh(devices)
  return evaluation.Evaluator(_sums, data, mesh, finish=finish)({"scale": jnp.float32(2.0)})


def _numpy_reference(arrays):
  ok = arrays["label"] != metrics.IGNORE_LABEL
  conf = np.zeros((C, C), np.int64)
  np.add.at(conf, (arrays["label"][ok], arrays["pred"][ok]), 1)
  inter, truth, predicted = np.diag(conf), conf.sum(1), conf.sum(0)
  union = truth + predicted - inter
  present = union > 0
  return conf, {
    "mean": float(np.mean(2.0 * arrays["value"])),
    "worst": float(np.max(np.abs(2.0 * arrays["value"]))),
    "pixel_acc": inter.sum() / conf.sum(),
    "mean_iou": np.mean(inter[present] / union[present]),
    "labelled": float(ok.sum()),
  }


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8
  arrays = _arrays()
  batches = evaluation.fixed_batches(arrays, B)
  one = _evaluate(jax.devices()[:1], lambda: batches)
  eight = _evaluate(jax.devices(), lambda: batches)
  assert one.keys() == eight.keys()
  for k in one:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-6, err_msg=k)
  assert eight["labelled"] == one["labelled"]  # integer sums: exact


def test_confusion_finish_equals_a_numpy_reference():
  arrays = _arrays(1)
  got = _evaluate(jax.devices(), lambda: evaluation.fixed_batches(arrays, B))
  conf, want = _numpy_reference(arrays)
  assert len(np.unique(arrays["pred"])) == C and conf.sum() < N * 6  # ignores really ignored
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)
  assert got == {**got, **metrics.segmentation_scores(conf)}  # bitwise: float64 on the host


def test_max_takes_the_maximum_over_batches_not_the_sum():
  arrays = _arrays(2)
  arrays["value"][:] = 1.0
  arrays["value"][N - 1] = -3.0  # the largest |value| sits in the last batch
  got = _evaluate(jax.devices(), lambda: evaluation.fixed_batches(arrays, B))
  assert got["worst"] == 6.0 and got["mean"] == pytest.approx(2.0 * (N - 4) / N)


def test_named_sets_are_suffixed_and_equal_each_set_alone():
  a, b = _arrays(3), _arrays(4)
  both = _evaluate(
    jax.devices(),
    lambda: {"a": evaluation.fixed_batches(a, B), "b": evaluation.fixed_batches(b, B)},
  )
  for name, arrays in (("a", a), ("b", b)):
    alone = _evaluate(jax.devices(), lambda arrays=arrays: evaluation.fixed_batches(arrays, B))
    assert {k: both[f"{k}_{name}"] for k in alone} == alone
  assert len(both) == 2 * len(alone)


def test_data_is_read_and_sharded_once():
  calls = []
  batches = evaluation.fixed_batches(_arrays(), B)
  evaluator = evaluation.Evaluator(
    _sums, lambda: calls.append(1) or batches, sharding.make_mesh(), finish=_finish
  )
  params = {"scale": jnp.float32(1.0)}
  first, second = evaluator(params), evaluator({"scale": jnp.float32(1.0)})
  assert first == second and len(calls) == 1
  assert all(isinstance(x, jax.Array) for b in evaluator.sets()[""] for x in b.values())


def test_errors_name_the_problem():
  batches = evaluation.fixed_batches(_arrays(), B)
  with pytest.raises(ValueError, match=r"\['confusion'\] are neither"):
    _evaluate(jax.devices(), lambda: batches, finish=None)
  with pytest.raises(ValueError, match="set 'x' is empty"):
    _evaluate(jax.devices(), lambda: {"x": []})
  with pytest.raises(ValueError, match="has 6 rows, not a multiple of the 8 devices"):
    _evaluate(jax.devices(), lambda: evaluation.fixed_batches(_arrays(), 6))


def test_the_loop_logs_eval_sums_and_finish_per_set(tmp_path):
  """train.train with two named sets: eval/<metric>_<set> from pairs, Max and finish."""

  def loss(params, model_state, batch, key, *, train):
    pred = batch["x"] * params["w"]
    return {"mse": losses.masked_mse(pred, batch["y"], batch["mask"])}, {}, model_state

  def eval_sums(params, model_state, batch, key):
    err = jnp.abs(batch["x"] * params["w"] - batch["y"])
    ((total, weight),) = loss(params, model_state, batch, key, train=False)[0].values()
    return {
      "mse": (total, weight),
      "worst": evaluation.Max(jnp.max(err)),
      "hist": jnp.sum(jax.nn.one_hot(jnp.minimum(err, 3.0).astype(jnp.int32), 4), (0, 1)),
    }

  def batch(seed, scale=1.0):
    x = (scale * np.random.default_rng(seed).normal(size=(8, 3))).astype(np.float32)
    return {"x": x, "y": 2.0 * x, "mask": np.ones((8, 3), bool)}

  class Data:
    def __next__(self):
      return batch(0)

    def get_state(self):
      return {}

    def set_state(self, state):
      pass

  sets = {"small": [batch(1)], "large": [batch(2), batch(3, scale=10.0)]}
  task = train.Task(
    init=lambda key: ({"w": jnp.float32(0.5)}, {}),
    loss=loss,
    optimizer=optax.sgd(0.0),
    train_data=Data(),
    eval_data=lambda: sets,
    eval_sums=eval_sums,
    eval_finish=lambda s: {"hist_3": float(s["hist"][3])},
  )
  options = train.LoopOptions(steps=2, log_every=1, checkpoint_every=2, async_checkpoints=False)
  _, final = train.train(task, options, str(tmp_path), seed=0)
  for name, batches in sets.items():
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    err = np.abs(0.5 * x - 2.0 * x)
    np.testing.assert_allclose(final[f"eval/mse_{name}"], np.mean(err**2), rtol=1e-6)
    np.testing.assert_allclose(final[f"eval/worst_{name}"], err.max(), rtol=1e-6)
    assert final[f"eval/hist_3_{name}"] == np.sum(err >= 3.0)
  assert final["eval/hist_3_small"] < final["eval/hist_3_large"]  # the sets really differ


def test_train_temp_mb_compiles_the_gradient_of_every_term():
  def loss(params, model_state, batch, key, *, train):
    y = jnp.tanh(batch["x"] @ params["w"])
    ones = jnp.float32(y.size)
    return {"a": (jnp.sum(y**2), ones), "b": (jnp.sum(y), ones)}, {}, model_state

  params = {"w": jnp.ones((64, 64))}
  mb = evaluation.train_temp_mb(loss, params, {}, {"x": np.ones((256, 64), np.float32)})
  assert mb > 0.0
