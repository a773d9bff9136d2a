"""The jitted train step: data parallelism, gradient accumulation and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskax.masking import losses, masks
from maskax.training import sharding, train
from maskax.training.train_step import make_train_step

T, F, D = 8, 4, 16


def _init(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (F, D)) / 2, "w2": jax.random.normal(k2, (D, 1)) / 4}, {}


def _loss_fn(mode):
  def loss(params, model_state, batch, key, *, train):
    step_mask = masks.sequence_mask(batch["lengths"], T)
    x = jnp.where(step_mask[..., None], batch["x"], 0.0)
    pred = jnp.tanh(x @ params["w1"]) @ params["w2"]
    mse = losses.masked_mse(pred, batch["y"], step_mask[..., None], mode=mode)
    return {"mse": mse}, {"valid_steps": (jnp.sum(step_mask), jnp.float32(1))}, model_state

  return loss


def _batch(rows=16, seed=0):
  rng = np.random.default_rng(seed)
  # Very uneven valid counts per device: rows 0..7 long, rows 8..15 mostly length 1 or 0.
  lengths = np.concatenate([rng.integers(6, T + 1, rows // 2), rng.integers(0, 2, rows // 2)])
  valid = np.arange(T)[None] < lengths[:, None]
  x = np.where(valid[..., None], rng.normal(size=(rows, T, F)), np.nan).astype(np.float32)
  y = np.where(valid[..., None], rng.normal(size=(rows, T, 1)), np.nan).astype(np.float32)
  return {"x": x, "y": y, "lengths": lengths.astype(np.int32)}


def _one_step(mode, devices, batch, accum=1):
  """Parameters after one SGD(lr=1) step, i.e. params - grads, on a mesh of `devices`."""
  mesh = sharding.make_mesh(devices)
  task = train.Task(init=_init, loss=_loss_fn(mode), optimizer=optax.sgd(1.0), train_data=iter(()))
  options = train.LoopOptions(steps=1, grad_accum_steps=accum)
  state = jax.jit(
    lambda k: train.TrainState(
      step=jnp.int32(0),
      params=_init(k)[0],
      opt_state=task.optimizer.init(_init(k)[0]),
      model_state={},
      key=k,
    ),
    out_shardings=sharding.replicated(mesh),
  )(jax.random.key(0))
  step = make_train_step(task, options, mesh)
  new_state, out = step(state, sharding.shard_batch(batch, mesh))
  return jax.device_get(new_state.params), jax.device_get(out)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "batch_mean", "full_mean"])
def test_eight_devices_equal_one_device(mode):
  assert jax.device_count() == 8
  batch = _batch()
  p1, out1 = _one_step(mode, jax.devices()[:1], batch)
  p8, out8 = _one_step(mode, jax.devices(), batch)
  for k in p1:
    np.testing.assert_allclose(p8[k], p1[k], atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(out8["sums"]["loss"][0], out1["sums"]["loss"][0], rtol=1e-6)


def test_sharded_token_mean_is_the_global_token_mean():
  batch = _batch()
  _, out = _one_step("token_mean", jax.devices(), batch)
  total, weight = out["sums"]["mse"]
  assert weight == np.sum(batch["lengths"])  # not a mean of per-device means
  params, _ = _init(jax.random.key(0))
  x = np.nan_to_num(batch["x"].astype(np.float64))
  pred = np.tanh(x @ np.float64(params["w1"])) @ np.float64(params["w2"])
  valid = np.arange(T)[None] < batch["lengths"][:, None]
  ref = np.sum(np.where(valid[..., None], (pred - np.nan_to_num(batch["y"])) ** 2, 0))
  np.testing.assert_allclose(total / weight, ref / valid.sum(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "batch_mean", "full_mean"])
def test_gradient_accumulation_equals_one_big_batch(mode):
  batch = _batch()
  p1, out1 = _one_step(mode, jax.devices(), batch)
  p4, out4 = _one_step(mode, jax.devices(), batch, accum=4)
  for k in p1:
    np.testing.assert_allclose(p4[k], p1[k], atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(out4["sums"]["loss"][0], out1["sums"]["loss"][0], rtol=1e-6)


def test_nonfinite_batch_leaves_state_bitwise_unchanged():
  batch = _batch()
  batch["x"][0, 0, 0] = np.inf  # a valid position: the loss really is non-finite
  mesh = sharding.make_mesh()
  params, _ = _init(jax.random.key(0))
  task = train.Task(
    init=_init, loss=_loss_fn("token_mean"), optimizer=optax.adam(1e-2), train_data=iter(())
  )
  state = train.TrainState(
    step=jnp.int32(5),
    params=params,
    opt_state=task.optimizer.init(params),
    model_state={},
    key=jax.random.key(1),
  )
  before = jax.device_get(state)
  step = make_train_step(task, train.LoopOptions(steps=1), mesh)
  after, out = step(
    jax.device_put(state, sharding.replicated(mesh)), sharding.shard_batch(batch, mesh)
  )
  after = jax.device_get(after)
  assert not out["finite"]
  assert after.step == 6
  for a, b in zip(
    jax.tree.leaves((after.params, after.opt_state)),
    jax.tree.leaves((before.params, before.opt_state)),
  ):
    assert np.array_equal(a, b)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(jax.device_get(out["sums"])))


@pytest.mark.parametrize(
  "optimizer",
  [
    optax.adam(float("nan")),
    optax.adam(float("inf")),
    # Finite gradients, an update that overflows float32 (what train.learning_rate=1e30 does
    # a step or two later).
    optax.chain(optax.scale(1e30), optax.scale(1e30)),
  ],
  ids=["lr_nan", "lr_inf", "overflowing_update"],
)
def test_nonfinite_update_is_skipped_although_loss_and_grads_are_finite(optimizer):
  mesh = sharding.make_mesh()
  params, _ = _init(jax.random.key(0))
  task = train.Task(
    init=_init, loss=_loss_fn("token_mean"), optimizer=optimizer, train_data=iter(())
  )
  state = train.TrainState(
    step=jnp.int32(0),
    params=params,
    opt_state=optimizer.init(params),
    model_state={},
    key=jax.random.key(1),
  )
  before = jax.device_get(state)
  step = make_train_step(task, train.LoopOptions(steps=1), mesh)
  after, out = step(
    jax.device_put(state, sharding.replicated(mesh)), sharding.shard_batch(_batch(), mesh)
  )
  after = jax.device_get(after)
  ((total, _),) = task.loss(params, {}, _batch(), jax.random.key(2), train=True)[0].values()
  assert np.isfinite(total)  # only the update is bad
  assert not out["finite"]
  for a, b in zip(
    jax.tree.leaves((after.params, after.opt_state)),
    jax.tree.leaves((before.params, before.opt_state)),
  ):
    assert np.array_equal(a, b)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of the device count"):
    sharding.shard_batch({"x": np.zeros((12, 2))}, sharding.make_mesh())
  with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple"):
    sharding.local_batch_size(12)


def test_loop_options_reject_bad_values():
  with pytest.raises(ValueError, match="train.steps=0"):
    train.LoopOptions(steps=0)
  with pytest.raises(ValueError, match="on_nonfinite"):
    train.LoopOptions(steps=1, on_nonfinite="ignore")
