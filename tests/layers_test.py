"""Mask-aware layers: padding invariance, garbage at masked positions, empty masks, references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maskax.rnn import layers

B, T, F = 3, 6, 4
LENGTHS = np.array([6, 3, 1])
PAD = 3  # extra padded steps appended in the invariance tests


def _mask(lengths, t):
  return jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]


def _data(seed=0):
  x = jax.random.normal(jax.random.key(seed), (B, T, F)) * 2.0 + 1.0
  return x, _mask(LENGTHS, T)


def _pad_with(x, mask, fill):
  """Appends PAD garbage steps and puts `fill` at every invalid step; returns (x, mask)."""
  x = jnp.concatenate([x, jnp.zeros((B, PAD, F))], axis=1)
  mask = jnp.concatenate([mask, jnp.zeros((B, PAD), bool)], axis=1)
  return jnp.where(mask[..., None], x, fill), mask


GARBAGE = [jnp.nan, jnp.inf, -1e6, 7.0]


def test_masked_moments_matches_numpy_on_valid_rows():
  x, mask = _data()
  x = jnp.where(mask[..., None], x, jnp.nan)
  mean, var = layers.masked_moments(x, mask, axes=(0, 1))
  rows = np.asarray(x, np.float64)[np.asarray(mask)]
  np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, rows.var(0), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=B * T, max_size=B * T), st.integers(0, 2**16))
def test_masked_moments_property_per_row(flags, seed):
  mask = jnp.asarray(np.reshape(flags, (B, T)))
  x = jax.random.normal(jax.random.key(seed), (B, T, F)) * 3.0
  mean, var = jax.jit(layers.masked_moments, static_argnums=2)(x, mask, (1,))
  for b in range(B):
    rows = np.asarray(x[b], np.float64)[np.asarray(mask[b])]
    want_mean = rows.mean(0) if len(rows) else np.zeros(F)
    want_var = rows.var(0) if len(rows) else np.zeros(F)
    np.testing.assert_allclose(mean[b], want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var[b], want_var, rtol=1e-4, atol=1e-5)


def test_masked_moments_empty_mask_and_garbage_grads():
  x = jnp.full((B, T, F), jnp.nan)
  mask = jnp.zeros((B, T), bool)
  mean, var = layers.masked_moments(x, mask, axes=(0, 1))
  assert np.all(mean == 0) and np.all(var == 0)
  x, mask = _data()
  x = jnp.where(mask[..., None], x, jnp.inf)
  grad = jax.grad(lambda x: jnp.sum(sum(layers.masked_moments(x, mask, axes=(0, 1)))))(x)
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)


def test_masked_moments_rejects_bad_input():
  x, mask = _data()
  with pytest.raises(ValueError, match="feature axis"):
    layers.masked_moments(x, mask, axes=(0, 2))
  with pytest.raises(ValueError, match="mask must be bool"):
    layers.masked_moments(x, mask.astype(jnp.float32), axes=(0, 1))
  with pytest.raises(ValueError, match="mask shape"):
    layers.masked_moments(x, mask[:, :2], axes=(0, 1))


@pytest.fixture(scope="module")
def bn():
  module = layers.MaskedBatchNorm(momentum=0.5)
  x, mask = _data()
  variables = module.init(jax.random.key(1), x, mask, use_running_average=False)
  # Non-trivial scale and bias so that the re-mask (not a zero bias) is what zeroes padding.
  variables = {
    "params": {"scale": jnp.arange(1.0, F + 1.0), "bias": jnp.full((F,), 0.5)},
    "batch_stats": variables["batch_stats"],
  }

  @jax.jit
  def train(variables, x, mask):
    return module.apply(variables, x, mask, use_running_average=False, mutable=["batch_stats"])

  return module, variables, train


def test_masked_bn_stats_match_numpy_reference(bn):
  _, variables, train = bn
  x, mask = _data()
  y, updated = train(variables, x, mask)
  rows = np.asarray(x, np.float64)[np.asarray(mask)]
  mean, var = rows.mean(0), rows.var(0)
  np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.5 * 0.0 + 0.5 * mean, rtol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["var"], 0.5 * 1.0 + 0.5 * var, rtol=1e-5)
  want = (np.asarray(x) - mean) / np.sqrt(var + 1e-5) * np.arange(1.0, F + 1.0) + 0.5
  valid = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y)[valid], want[valid], rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(y)[~valid] == 0)


@pytest.mark.parametrize("fill", GARBAGE)
def test_masked_bn_padding_invariance(bn, fill):
  _, variables, train = bn
  x, mask = _data()
  y, stats = train(variables, x, mask)
  xp, maskp = _pad_with(x, mask, fill)
  yp, statsp = train(variables, xp, maskp)
  np.testing.assert_allclose(yp[:, :T], y, rtol=1e-6, atol=1e-6)
  assert np.all(yp[:, T:] == 0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats, statsp)


def test_plain_batchnorm_breaks_padding_invariance():
  module = nn.BatchNorm(use_running_average=False, momentum=0.5)
  x, mask = _data()
  xp, _ = _pad_with(x, mask, 0.0)  # even zero padding shifts the statistics
  variables = module.init(jax.random.key(1), x)
  y, stats = module.apply(variables, x, mutable=["batch_stats"])
  yp, statsp = module.apply(variables, xp, mutable=["batch_stats"])
  valid = np.asarray(mask)
  assert not np.allclose(np.asarray(yp[:, :T])[valid], np.asarray(y)[valid], atol=1e-3)
  assert not np.allclose(statsp["batch_stats"]["mean"], stats["batch_stats"]["mean"], atol=1e-3)


def test_masked_bn_garbage_grads_zero_and_unchanged(bn):
  module, variables, _ = bn
  x, mask = _data()
  w = jax.random.normal(jax.random.key(2), (B, T, F))

  def loss(params, x):
    y, _ = module.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      mask,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return jnp.sum(jnp.where(mask[..., None], y * w, 0.0))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  g_params, g_x = grad(variables["params"], x)
  for fill in GARBAGE:
    gp_params, gp_x = grad(variables["params"], jnp.where(mask[..., None], x, fill))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_params, gp_params
    )
    np.testing.assert_allclose(gp_x, g_x, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(gp_x))
    assert np.all(np.asarray(gp_x)[~np.asarray(mask)] == 0)


def test_masked_bn_empty_batch_keeps_running_stats(bn):
  _, variables, train = bn
  _, stats = train(variables, *_data())  # running stats away from their (0, 1) init
  variables = {"params": variables["params"], **stats}
  x = jnp.full((B, T, F), jnp.nan)
  y, stats = train(variables, x, jnp.zeros((B, T), bool))
  assert np.all(y == 0)
  jax.tree.map(np.testing.assert_array_equal, stats["batch_stats"], variables["batch_stats"])


def test_flax_bn_mask_argument_gives_nan_on_empty_batch():
  # Why MaskedBatchNorm exists although flax 0.12 has `mask=`: an empty batch poisons the stats.
  module = nn.BatchNorm(use_running_average=False)
  x = jnp.ones((B, T, F))
  variables = module.init(jax.random.key(1), x)
  _, stats = module.apply(variables, x, mask=jnp.zeros((B, T, F), bool), mutable=["batch_stats"])
  assert np.all(np.isnan(stats["batch_stats"]["mean"]))


def test_masked_bn_running_average_and_jit_equals_eager(bn):
  module, variables, train = bn
  x, mask = _data()
  _, stats = train(variables, x, mask)
  variables = {"params": variables["params"], **stats}
  y = module.apply(variables, x, mask, use_running_average=True)
  mean, var = stats["batch_stats"]["mean"], stats["batch_stats"]["var"]
  scale = jnp.arange(1.0, F + 1.0)
  want = (x - mean[None, None]) / jnp.sqrt(var + 1e-5)[None, None] * scale[None, None] + 0.5
  np.testing.assert_allclose(y, jnp.where(mask[..., None], want, 0.0), rtol=1e-5, atol=1e-5)
  y_eager, _ = module.apply(variables, x, mask, use_running_average=False, mutable=["batch_stats"])
  y_jit, _ = train(variables, x, mask)
  np.testing.assert_allclose(y_jit, y_eager, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module", params=["SAME", "CAUSAL"])
def conv(request):
  module = layers.MaskedConv1D(
    features=5, kernel_size=3, padding=request.param, bias_init=nn.initializers.constant(0.3)
  )
  x, mask = _data()
  variables = module.init(jax.random.key(3), x, mask)
  return module, variables, jax.jit(module.apply)


@pytest.mark.parametrize("fill", GARBAGE)
def test_masked_conv_equals_each_row_alone_under_garbage(conv, fill):
  module, variables, apply = conv
  x, mask = _data()
  xp, maskp = _pad_with(x, mask, fill)
  y = apply(variables, xp, maskp)
  assert np.all(y[:, T:] == 0) and np.all(np.isfinite(y))
  plain = nn.Conv(5, (3,), padding=module.padding)
  for b, length in enumerate(LENGTHS):
    alone = plain.apply({"params": variables["params"]["conv"]}, x[b : b + 1, :length])
    np.testing.assert_allclose(y[b, :length], alone[0], rtol=1e-5, atol=1e-5)
    assert np.all(y[b, length:] == 0)


def test_plain_conv_breaks_padding_invariance(conv):
  module, variables, _ = conv
  x, mask = _data()
  plain = nn.Conv(5, (3,), padding=module.padding)
  params = {"params": variables["params"]["conv"]}
  xp, _ = _pad_with(x, mask, 7.0)
  y, yp = plain.apply(params, x), plain.apply(params, xp)
  # Row 1 (length 3): a centred kernel at the last valid step reads the padding.
  changed = not np.allclose(yp[1, :3], y[1, :3], atol=1e-3)
  assert changed == (module.padding == "SAME")
  # Under either padding the plain conv writes the bias (and more) into padded steps.
  assert not np.allclose(yp[1, 3:T], 0.0, atol=1e-3)


def test_masked_conv_grads_wrt_masked_inputs_zero(conv):
  _, variables, apply = conv
  x, mask = _data()
  x = jnp.where(mask[..., None], x, jnp.nan)
  g = jax.grad(lambda x: jnp.sum(apply(variables, x, mask) ** 2))(x)
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[~np.asarray(mask)] == 0)


def test_pools_match_numpy_and_handle_empty_rows():
  x, mask = _data()
  mask = mask.at[2].set(False)
  xg = jnp.where(mask[..., None], x, jnp.nan)
  mean, mx = layers.masked_mean_pool(xg, mask), layers.masked_max_pool(xg, mask)
  for b in range(2):
    rows = np.asarray(x[b])[np.asarray(mask[b])]
    np.testing.assert_allclose(mean[b], rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mx[b], rows.max(0), rtol=1e-6)
  assert np.all(mean[2] == 0) and np.all(mx[2] == 0)
  for pool in (layers.masked_mean_pool, layers.masked_max_pool):
    g = jax.grad(lambda x: jnp.sum(pool(x, mask) ** 2))(xg)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~np.asarray(mask)] == 0)


def test_remask_after_relu_and_custom_value():
  x, mask = _data()
  xg = jnp.where(mask[..., None], x, jnp.nan)
  y = layers.remask(jax.nn.relu(xg), mask)
  np.testing.assert_array_equal(y, jnp.where(mask[..., None], jax.nn.relu(x), 0.0))
  z = layers.remask(xg, mask, value=-1.0)
  assert np.all(np.asarray(z)[~np.asarray(mask)] == -1)
  same_shape = layers.remask(xg[..., 0], mask)
  np.testing.assert_array_equal(same_shape, jnp.where(mask, x[..., 0], 0.0))
  g = jax.grad(lambda x: jnp.sum(layers.remask(jax.nn.relu(x), mask)))(xg)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~np.asarray(mask)] == 0)
