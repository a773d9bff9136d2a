"""Tests for maskax.models.fcn: any image size, no dense layers, skips, finite grads, overfits,
the segmenter and class weights used by experiments/fcn_segmentation.py, the prediction grid."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskax.models import fcn
from maskax.models.fcn import FCN, FCNConfig

# Tiny: 3 stages (total stride 8), skips fused down to stride 2 (every pool is used).
CFG = FCNConfig(num_classes=4, widths=(4, 8, 8), skips=2, convs_per_stage=1)


def _key(seed):
  # XLA:CPU takes seconds to compile each threefry draw; rbg keys keep the tests fast.
  return jax.random.key(seed, impl="rbg")


def _uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _param_shapes(cfg, shape):
  """Parameter shapes without running init (no compile)."""
  init = lambda x: FCN(cfg).init(_key(0), x, train=False)
  return jax.eval_shape(init, jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda k, x: FCN(CFG).init(k, x, train=False))(
    _key(0), jnp.zeros((1, 16, 16, 3), jnp.float32)
  )


@pytest.fixture(scope="module")
def apply():
  return jax.jit(lambda p, x: FCN(CFG).apply(p, x, train=False))


def _num_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_output_matches_input_size_at_two_sizes(params, apply):
  # 16x16 is a multiple of the stride; 12x20 is not and is padded internally then cropped.
  for shape in [(2, 16, 16, 3), (1, 12, 20, 3)]:
    x = _uniform(1, shape)
    logits = apply(params, x)
    assert logits.shape == shape[:3] + (4,) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_jit_equals_eager(params, apply):
  x = _uniform(2, (2, 16, 16, 3))
  eager = FCN(CFG).apply(params, x, train=False)
  np.testing.assert_allclose(apply(params, x), eager, rtol=1e-5, atol=1e-5)


def test_params_independent_of_image_size(params):
  other = _param_shapes(CFG, (3, 24, 40, 3))
  assert jax.tree.structure(other) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, other) == jax.tree.map(jnp.shape, params)
  assert _num_params(other) == _num_params(params)
  # No dense layers: every kernel is a conv kernel [kh, kw, in, out].
  kernels = [x for path, x in jax.tree.leaves_with_path(params) if path[-1].key == "kernel"]
  assert kernels and all(k.ndim == 4 for k in kernels)


def test_skips_add_zero_initialised_score_layers(params):
  coarse = _param_shapes(dataclasses.replace(CFG, skips=CFG.stride), (1, 8, 8, 3))["params"]
  fine = params["params"]
  assert set(coarse) < set(fine)
  skip_names = sorted(set(fine) - set(coarse))
  assert skip_names == ["score_skip0", "score_skip1"]
  for name in skip_names:  # Long et al. 2015 §4.2: the net starts as the coarser one.
    assert not np.any(fine[name]["kernel"])


@pytest.fixture(scope="module")
def overfit_run(params):
  """40 Adam steps on one tiny batch, compiled once: (grads at init, losses per step)."""
  # Two 16x16 images: a left half of class 1, a square of class 2, tinted by class on noise.
  yy, xx = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  square = (abs(yy - 8) < 4) & (abs(xx - 8) < 4)
  labels = np.stack([np.where(xx < 8, 1, 0), np.where(square, 2, 0)])
  images = np.random.default_rng(0).uniform(0, 0.3, (2, 16, 16, 3)) + 0.6 * np.eye(3)[labels]
  images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
  opt = optax.adam(1e-2)

  def loss_fn(p):
    logits = FCN(CFG).apply(p, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), (loss, g)

    _, (losses, grads) = jax.lax.scan(step, (p, opt.init(p)), None, length=40)
    return jax.tree.map(lambda g: g[0], grads), losses

  return train(params)


def test_grads_finite_and_nonzero(overfit_run):
  leaves = [np.asarray(g) for g in jax.tree.leaves(overfit_run[0])]
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert all(np.abs(g).sum() > 0 for g in leaves)


def test_overfits_one_tiny_batch(overfit_run):
  losses = np.asarray(overfit_run[1])
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_dropout_only_in_training(params, apply):
  model = FCN(dataclasses.replace(CFG, dropout_rate=0.5))
  x = _uniform(5, (2, 16, 16, 3))

  @jax.jit
  def run(p, k, x):
    return model.apply(p, x, train=True, rngs={"dropout": k}), model.apply(p, x, train=False)

  (a, eval_a), (b, _) = run(params, _key(0), x), run(params, _key(1), x)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(eval_a, apply(params, x), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_logits_and_params(params, apply):
  cfg = dataclasses.replace(CFG, dtype=jnp.bfloat16)
  shapes = _param_shapes(cfg, (1, 16, 16, 3))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  x = _uniform(6, (1, 16, 16, 3))
  logits = jax.jit(lambda p, x: FCN(cfg).apply(p, x, train=False))(params, x)
  assert logits.dtype == jnp.float32 and logits.shape == (1, 16, 16, 4)
  np.testing.assert_allclose(logits, apply(params, x), atol=0.1)


def test_bad_config_and_inputs_raise():
  with pytest.raises(ValueError, match="skips"):
    FCNConfig(widths=(4, 8, 8), skips=16)
  with pytest.raises(ValueError, match="skips"):
    FCNConfig(widths=(4, 8, 8), skips=3)
  with pytest.raises(ValueError, match="num_classes"):
    FCNConfig(num_classes=1)
  with pytest.raises(ValueError, match="widths"):
    FCNConfig(widths=())
  with pytest.raises(ValueError, match=r"\[B, H, W, channels\]"):
    _param_shapes(CFG, (16, 16, 3))


def test_segmenter_is_the_argmax_of_the_logits(params):
  x = _uniform(5, (2, 16, 24, 3))
  labels = np.asarray(fcn.make_segmenter(FCN(CFG))(params["params"], x))
  want = np.argmax(FCN(CFG).apply(params, x, train=False), -1)
  assert labels.shape == (2, 16, 24)
  np.testing.assert_array_equal(labels, want)


def test_class_weights_count_pixels_of_images_holding_the_class():
  labels = np.zeros((3, 4, 4), np.uint8)
  labels[0, :2] = 1  # class 1: 8 pixels, only in image 0
  labels[1, 0, 0] = 255  # ignored: counts nowhere
  labels[2, :, :1] = 2  # class 2: 4 pixels, only in image 2
  # Pixels of the images holding each class: 0 -> all 47 labelled, 1 -> 16, 2 -> 16.
  freq = np.array([35 / 47, 8 / 16, 4 / 16])
  median = fcn.class_weights(labels, 4, method="median")
  np.testing.assert_allclose(median, list(np.median(freq) / freq) + [0.0], rtol=1e-6)
  inverse = fcn.class_weights(labels, 4, method="inverse")
  np.testing.assert_allclose(inverse, [47 / (3 * c) for c in (35, 8, 4)] + [0.0], rtol=1e-6)


def test_prediction_grid_has_a_row_per_image(tmp_path):
  from PIL import Image

  from maskax.data import images

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (3, 8, 8))
  labels[0, 0] = 255
  path = images.write_prediction_grid(
    str(tmp_path / "grid.png"), rng.uniform(size=(3, 8, 8, 3)), labels, labels, 4, title="t"
  )
  with Image.open(path) as im:
    assert im.size == (600, 3 * 200)  # 6 x 2n inches at 100 dpi
