"""Tests for maskax.masking.losses against float64 references, hand-computed values and bad arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

from losses_test import (
  B,
  C,
  CLASS_WEIGHTS,
  PROP,
  SEEDS,
  T,
  V,
  _dense_case,
  _feature_make,
  _mlm_make,
  _normal,
)
from maskax.masking import losses


def np_xent(logits, labels, ls=0.0):
  """Per-element cross-entropy of valid-looking labels (garbage labels clipped, result unused)."""
  z = np.asarray(logits, np.float64) - np.max(logits, -1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.clip(labels, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0]
  return (1 - ls) * nll + ls * -logp.mean(-1)


def np_reduce(per_elem, valid, w, mode):
  """Plain-loop reference of the four normalisations (rows = axis 0)."""
  w = np.ones(np.shape(per_elem)) if w is None else w
  rows = [
    (np.asarray(l, np.float64)[v], np.asarray(u, np.float64)[v], v.size)
    for l, v, u in zip(per_elem, valid, w)
  ]
  if mode == "sequence_mean":
    means = [(u * l).sum() / u.sum() for l, u, _ in rows if u.sum() > 0]
    return sum(means), len(means)
  weight = {
    "token_mean": sum(u.sum() for _, u, _ in rows),
    "batch_mean": sum(len(l) > 0 for l, _, _ in rows),
    "full_mean": sum(n for _, _, n in rows),
  }[mode]
  return sum((u * l).sum() for l, u, _ in rows), weight


def test_safe_div_values_and_finite_grads_at_zero_weight():
  t, w = jnp.array([3.0, 5.0, 0.0]), jnp.array([2.0, 0.0, 0.0])
  np.testing.assert_array_equal(losses.safe_div(t, w), [1.5, 0.0, 0.0])
  gt, gw = jax.grad(lambda t, w: jnp.sum(losses.safe_div(t, w)), argnums=(0, 1))(t, w)
  np.testing.assert_array_equal(gt, [0.5, 0.0, 0.0])
  np.testing.assert_array_equal(gw, [-0.75, 0.0, 0.0])


def test_reduce_loss_modes_by_hand():
  """Rows of length 1 and 3 with losses [2] and [1, 2, 3]; a third row is padding."""
  per_elem = jnp.array([[2.0, 9.0, 9.0], [1.0, 2.0, 3.0], [7.0, 7.0, 7.0]])
  mask = jnp.array([[1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
  expected = {
    "token_mean": (8, 4),
    "sequence_mean": (4, 2),
    "batch_mean": (8, 2),
    "full_mean": (8, 9),
  }
  for mode, pair in expected.items():
    np.testing.assert_allclose(losses.reduce_loss(per_elem, mask, mode=mode), pair, err_msg=mode)


@pytest.mark.parametrize("mode", losses.MODES)
@pytest.mark.parametrize("ls", [0.0, 0.2])
@PROP
@given(seed=SEEDS)
def test_masked_xent_matches_float64_reference(mode, ls, seed):
  rng = np.random.default_rng(seed)
  logits = (3 * rng.normal(size=(B, T, V))).astype(np.float32)
  labels = np.where(rng.random((B, T)) < 0.2, -100, rng.integers(0, V, (B, T))).astype(np.int32)
  mask, w = rng.random((B, T)) < 0.7, rng.random((B, T)).astype(np.float32)
  got = _jit_xent(mode, ls)(logits, labels, mask, w)
  ref = np_reduce(np_xent(logits, labels, ls), mask & (labels != -100), w, mode)
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-5)


@functools.cache
def _jit_xent(mode, ls):
  return jax.jit(
    lambda lo, la, m, w: losses.masked_xent(
      lo, la, m, label_smoothing=ls, ignore_index=-100, weights=w, mode=mode
    )
  )


def test_label_smoothing_matches_optax():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(B, T, V)).astype(np.float32), rng.integers(0, V, (B, T))
  ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, V), 0.1))
  total, weight = losses.masked_xent(logits, labels, np.ones((B, T), bool), label_smoothing=0.1)
  np.testing.assert_allclose(total, ref.sum(), rtol=1e-5)
  assert float(weight) == B * T


def test_mlm_loss_matches_bert_formula_and_accuracy():
  rng = np.random.default_rng(0)
  logits, aux = _mlm_make(rng)
  w = aux["w"] * rng.choice([0.5, 1.0], (B, T)).astype(np.float32)
  nll = np_xent(logits, aux["ids"])
  total, weight = losses.mlm_loss(logits, aux["ids"], w)
  np.testing.assert_allclose((total, weight), ((w * nll).sum(), w.sum()), rtol=1e-5)
  bert = (w * nll).sum() / (w.sum() + 1e-5)  # google-research/bert run_pretraining.py
  np.testing.assert_allclose(losses.safe_div(total, weight), bert, rtol=1e-4)
  correct = (logits.argmax(-1) == aux["ids"]) * w
  np.testing.assert_allclose(losses.mlm_accuracy(logits, aux["ids"], w), (correct.sum(), w.sum()))


def test_nsp_and_masked_accuracy_match_reference():
  rng = np.random.default_rng(0)
  logits, labels = _normal(rng, B, 2), rng.integers(0, 2, B).astype(np.int32)
  mask = np.array([True, False, True, True])
  np.testing.assert_allclose(
    losses.nsp_loss(logits, labels, mask), (np_xent(logits, labels)[mask].sum(), 3), rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.nsp_loss(logits, labels), (np_xent(logits, labels).sum(), B), rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.masked_accuracy(logits, labels, mask), ((logits.argmax(-1) == labels)[mask].sum(), 3)
  )


@pytest.mark.parametrize("mode", losses.MODES)
def test_mse_and_gaussian_nll_match_reference(mode):
  rng = np.random.default_rng(0)
  (pred, log_var), aux = _feature_make(rng, 2)
  mask, target = aux["mask"], aux["target"]
  np.testing.assert_allclose(
    losses.masked_mse(pred, target, mask, mode=mode),
    np_reduce((pred - target) ** 2, mask, None, mode),
    rtol=1e-5,
  )
  lv, pr, tg = (a.astype(np.float64) for a in (log_var, pred, target))
  nll = 0.5 * (lv + (tg - pr) ** 2 * np.exp(-lv) + np.log(2 * np.pi))
  np.testing.assert_allclose(
    losses.masked_gaussian_nll(pred, log_var, target, mask, mode=mode),
    np_reduce(nll, mask, None, mode),
    rtol=1e-5,
  )


def test_dense_xent_class_weights_hand_computed_3x3():
  """logits [log 3, 0] everywhere: loss(label 0) = log(4/3), loss(label 1) = log 4."""
  logits = np.zeros((1, 3, 3, 2), np.float32)
  logits[..., 0] = np.log(3.0)
  labels = np.array([[[0, 0, 1], [0, 255, 1], [0, 0, 0]]], np.int32)
  total, weight = losses.dense_xent(logits, labels, class_weights=np.array([1.0, 4.0]))
  # Six class-0 pixels (weight 1), two class-1 pixels (weight 4), one ignored pixel.
  np.testing.assert_allclose(total, 6 * np.log(4 / 3) + 8 * np.log(4.0), rtol=1e-6)
  np.testing.assert_allclose(weight, 6 + 8)
  np.testing.assert_allclose(losses.dense_xent(logits, labels, mode="batch_mean")[1], 1.0)
  keep = np.ones((1, 3, 3), bool)
  keep[0, 0, 2] = False  # sampled out: one class-1 pixel fewer
  np.testing.assert_allclose(
    losses.dense_xent(logits, labels, class_weights=np.array([1.0, 4.0]), keep=keep),
    (6 * np.log(4 / 3) + 4 * np.log(4.0), 10),
    rtol=1e-6,
  )


@pytest.mark.parametrize("mode", losses.MODES)
def test_dense_xent_matches_float64_reference(mode):
  case = _dense_case(mode)
  logits, aux = case.make(np.random.default_rng(2))
  valid = aux["keep"] & (aux["labels"] != 255)
  w = CLASS_WEIGHTS[np.clip(aux["labels"], 0, C - 1)]
  np.testing.assert_allclose(
    case.loss(logits, aux), np_reduce(np_xent(logits, aux["labels"]), valid, w, mode), rtol=1e-5
  )


def test_class_weights_from_counts():
  counts = np.array([10.0, 30.0, 0.0, 60.0])
  # freq = [.1, .3, -, .6]; median over present classes = .3; K = 3 present classes.
  np.testing.assert_allclose(
    losses.class_weights_from_counts(counts, method="median"), [3.0, 1.0, 0.0, 0.5], rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.class_weights_from_counts(counts, method="inverse"),
    [10 / 3, 10 / 9, 0.0, 5 / 9],
    rtol=1e-6,
  )
  inv = losses.class_weights_from_counts(counts)
  np.testing.assert_allclose((counts * inv).sum() / counts.sum(), 1.0, rtol=1e-6)
  # Eigen & Fergus: frequency within the images where the class is present; even K -> mean of
  # the two middle frequencies: freq = [.1, .6, .6, .2], median = .4.
  got = losses.class_weights_from_counts(
    np.array([10.0, 30.0, 60.0, 20.0]),
    method="median",
    present_pixels=np.array([100.0, 50.0, 100.0, 100.0]),
  )
  np.testing.assert_allclose(got, [4.0, 2 / 3, 2 / 3, 2.0], rtol=1e-6)


_Z = dict(logits=np.zeros((2, 3, 4)), labels=np.zeros((2, 3), np.int32), mask=np.ones((2, 3), bool))


@pytest.mark.parametrize(
  "match, call",
  [
    ("mode", lambda: losses.masked_xent(**_Z, mode="mean")),
    ("labels", lambda: losses.masked_xent(**dict(_Z, labels=_Z["labels"] * 1.0))),
    ("logits", lambda: losses.masked_xent(**dict(_Z, logits=_Z["logits"][:, :2]))),
    ("mask", lambda: losses.masked_xent(**dict(_Z, mask=_Z["mask"] * 1.0))),
    ("label_smoothing", lambda: losses.masked_xent(**_Z, label_smoothing=1.0)),
    (
      "class_weights",
      lambda: losses.dense_xent(
        np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2), int), class_weights=np.ones(2)
      ),
    ),
    ("method", lambda: losses.class_weights_from_counts(np.ones(3), method="log")),
    ("mask", lambda: losses.masked_mse(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 2), bool))),
  ],
)
def test_bad_arguments_raise_named_errors(match, call):
  with pytest.raises(ValueError, match=match):
    call()
