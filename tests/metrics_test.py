"""Tests for maskax.masking.metrics: confusion matrix and the four FCN scores against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskax.masking import metrics
from maskax.data import segmentation


_jit_confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)


def _reference_confusion(pred, labels, num_classes, ignore_label=255):
  conf = np.zeros((num_classes, num_classes), np.float64)
  for p, t in zip(np.ravel(pred), np.ravel(labels)):
    if t != ignore_label:
      conf[t, p] += 1
  return conf


def _reference_scores(conf):
  """Plain loops over classes, with the documented absent-class convention."""
  c = conf.shape[0]
  total = conf.sum()
  accs, ious, fw = [], [], 0.0
  for i in range(c):
    t_i = conf[i, :].sum()
    p_i = conf[:, i].sum()
    if t_i > 0:
      accs.append(conf[i, i] / t_i)
    if t_i + p_i > 0:
      iou = conf[i, i] / (t_i + p_i - conf[i, i])
      ious.append(iou)
      fw += t_i * iou
  return {
    "pixel_acc": np.trace(conf) / total,
    "mean_acc": np.mean(accs),
    "mean_iou": np.mean(ious),
    "fw_iou": fw / total,
  }


@settings(max_examples=25, deadline=None)
@given(
  num_classes=st.integers(2, 6),
  ignore_prob=st.floats(0.0, 1.0),
  seed=st.integers(0, 2**31 - 1),
)
def test_confusion_and_scores_match_reference(num_classes, ignore_prob, seed):
  # One shape, so the jitted function compiles once per num_classes.
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=(2, 5, 7))
  labels = np.where(rng.uniform(size=labels.shape) < ignore_prob, 255, labels)
  pred = rng.integers(0, num_classes, size=labels.shape)
  conf = _jit_confusion(pred.astype(np.int32), labels.astype(np.int32), num_classes)
  ref = _reference_confusion(pred, labels, num_classes)
  assert conf.dtype == jnp.int32 and conf.shape == (num_classes, num_classes)
  np.testing.assert_array_equal(np.asarray(conf), ref)
  if ref.sum() > 0:
    got = metrics.segmentation_scores(conf)
    want = _reference_scores(ref)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)


def test_jit_equals_eager_and_sums_over_batches():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=(4, 8, 8)).astype(np.int32)
  labels[:, :2] = 255
  pred = rng.integers(0, 5, size=(4, 8, 8)).astype(np.int32)
  eager = metrics.confusion_matrix(pred, labels, 5)
  np.testing.assert_array_equal(_jit_confusion(pred, labels, 5), eager)
  summed = _jit_confusion(pred[:2], labels[:2], 5) + _jit_confusion(pred[2:], labels[2:], 5)
  np.testing.assert_array_equal(summed, eager)


def test_ignored_pixels_never_count():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, size=(3, 6, 6))
  labels[:, ::2] = 255
  pred = rng.integers(0, 4, size=(3, 6, 6))
  other = np.where(labels == 255, rng.integers(0, 4, size=pred.shape), pred)
  a = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels), 4)
  b = metrics.confusion_matrix(jnp.asarray(other), jnp.asarray(labels), 4)
  np.testing.assert_array_equal(a, b)
  assert int(a.sum()) == int((labels != 255).sum())


def test_absent_class_convention():
  # Class 2 absent from truth and prediction: left out. Class 3 only predicted: IoU 0, counts
  # in mean IU but not in mean accuracy.
  conf = np.array([[5, 0, 0, 1], [0, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  scores = metrics.segmentation_scores(conf)
  np.testing.assert_allclose(scores["mean_iou"], (5 / 6 + 1.0 + 0.0) / 3)
  np.testing.assert_allclose(scores["mean_acc"], (5 / 6 + 1.0) / 2)
  np.testing.assert_allclose(scores["pixel_acc"], 9 / 10)
  np.testing.assert_allclose(scores["fw_iou"], (6 * 5 / 6 + 4 * 1.0) / 10)
  iou = metrics.class_iou(conf)
  assert np.isnan(iou[2]) and iou[3] == 0.0


def test_perfect_prediction_scores_one():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, size=(2, 5, 5))
  labels[0, 0] = 255
  pred = np.where(labels == 255, 0, labels)
  scores = metrics.segmentation_scores(metrics.confusion_matrix(pred, labels, 5))
  assert scores == {"pixel_acc": 1.0, "mean_acc": 1.0, "mean_iou": 1.0, "fw_iou": 1.0}


def test_bad_inputs_raise():
  ok = np.zeros((2, 3), np.int32)
  with pytest.raises(ValueError, match="same shape"):
    metrics.confusion_matrix(ok, np.zeros((3, 2), np.int32), 3)
  with pytest.raises(ValueError, match="argmax"):
    metrics.confusion_matrix(ok.astype(np.float32), ok, 3)
  with pytest.raises(ValueError, match="labels holds values"):
    metrics.confusion_matrix(ok, np.full((2, 3), 7, np.int32), 3)
  with pytest.raises(ValueError, match="pred holds values"):
    metrics.confusion_matrix(np.full((2, 3), 255, np.int32), ok, 3)
  with pytest.raises(ValueError, match="empty"):
    metrics.segmentation_scores(np.zeros((3, 3)))
  with pytest.raises(ValueError, match="square"):
    metrics.segmentation_scores(np.zeros((3, 2)))


def test_all_background_baseline_on_synthetic_set():
  num_classes = 6
  _, labels = segmentation.make_dataset(300, height=64, width=64, seed=0, num_classes=num_classes)
  pred = np.zeros(labels.shape, np.int32)
  conf = metrics.confusion_matrix(pred, labels.astype(np.int32), num_classes)
  scores = metrics.segmentation_scores(conf)
  bg = segmentation.class_frequencies(labels, num_classes)[0]
  print(f"all-background baseline: {scores}")
  # Only the background row/column is non-empty in the predictions: IoU_0 = bg share, every
  # other (present) class has IoU 0.
  np.testing.assert_allclose(scores["pixel_acc"], bg, rtol=1e-12)
  np.testing.assert_allclose(scores["mean_iou"], bg / num_classes, rtol=1e-12)
  np.testing.assert_allclose(scores["mean_acc"], 1 / num_classes, rtol=1e-12)
