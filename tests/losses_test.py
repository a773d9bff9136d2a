"""Tests for maskax.losses: float64 references, the mask contract for every loss, micro-batches."""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from maskax import losses

B, T, V, F, H, W, C = 4, 5, 7, 3, 3, 4, 5
GARBAGE = (np.nan, np.inf, -np.inf, 1e30)
BAD_LABELS = np.array([-1, -(2**31), V, 10**6], np.int32)
SEEDS = st.integers(0, 2**31 - 1)
PROP = settings(max_examples=20, deadline=None)


def np_xent(logits, labels, ls=0.0):
  """Per-element cross-entropy of valid-looking labels (garbage labels clipped, result unused)."""
  z = np.asarray(logits, np.float64) - np.max(logits, -1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.clip(labels, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0]
  return (1 - ls) * nll + ls * -logp.mean(-1)


def np_reduce(per_elem, valid, w, mode):
  """Plain-loop reference of the four normalisations (rows = axis 0)."""
  w = np.ones(np.shape(per_elem)) if w is None else w
  rows = [(np.asarray(l, np.float64)[v], np.asarray(u, np.float64)[v], v.size)
          for l, v, u in zip(per_elem, valid, w)]
  if mode == "sequence_mean":
    means = [(u * l).sum() / u.sum() for l, u, _ in rows if u.sum() > 0]
    return sum(means), len(means)
  weight = {"token_mean": sum(u.sum() for _, u, _ in rows),
            "batch_mean": sum(len(l) > 0 for l, _, _ in rows),
            "full_mean": sum(n for _, _, n in rows)}[mode]
  return sum((u * l).sum() for l, u, _ in rows), weight


@dataclasses.dataclass(frozen=True)
class Case:
  """A loss under test: x = its differentiable inputs (pytree), aux = labels, masks, targets."""
  name: str
  loss: Callable  # (x, aux) -> (total, weight)
  make: Callable  # rng -> (x, aux), with B rows on axis 0 of every array
  valid: Callable  # aux -> bool[B, ...]: which rows/elements count
  mask_key: str  # the aux entry that, all False/0, leaves nothing valid
  garbage: Callable = lambda aux, rng: aux  # aux with garbage wherever not valid
  mode: str = "token_mean"
  differentiable: bool = True

  def masked(self, x, aux):
    """bool pytree like x: True where x does not count (a trailing V/C axis broadcast)."""
    invalid = ~self.valid(aux)
    return jax.tree.map(
        lambda a: np.broadcast_to(invalid.reshape(invalid.shape + (1,) * (a.ndim - invalid.ndim)),
                                  a.shape), x)

  def empty(self, aux):
    return dict(aux, **{self.mask_key: np.zeros_like(aux[self.mask_key])})


def _normal(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def _bad_labels(key, valid):
  """aux -> aux with out-of-range and negative labels wherever `valid(aux)` is False."""
  return lambda a, rng: dict(a, **{key: np.where(valid(a), a[key],
                                                  rng.choice(BAD_LABELS, a[key].shape))})


def _xent_case(mode, ls=0.0):
  make = lambda rng: (_normal(rng, B, T, V), dict(
      labels=rng.integers(0, V, (B, T)).astype(np.int32), mask=rng.random((B, T)) < 0.6))
  valid = lambda a: a["mask"]
  return Case(
      f"xent-{mode}-ls{ls}",
      lambda x, a: losses.masked_xent(x, a["labels"], a["mask"], label_smoothing=ls, mode=mode),
      make, valid, "mask", _bad_labels("labels", valid), mode=mode)


def _xent_ignore_weights_case():
  def make(rng):
    labels = np.where(rng.random((B, T)) < 0.2, -100, rng.integers(0, V, (B, T)))
    return _normal(rng, B, T, V), dict(labels=labels.astype(np.int32), w=_normal(rng, B, T) ** 2,
                                       mask=rng.random((B, T)) < 0.7)
  valid = lambda a: a["mask"] & (a["labels"] != -100)
  return Case(
      "xent-ignore-weights",
      lambda x, a: losses.masked_xent(x, a["labels"], a["mask"], ignore_index=-100, weights=a["w"]),
      make, valid, "mask",
      lambda a, rng: dict(a, w=np.where(valid(a), a["w"], np.nan).astype(np.float32)))


def _mlm_make(rng):
  w = (rng.random((B, T)) < 0.6).astype(np.float32)
  return _normal(rng, B, T, V), dict(
      ids=np.where(w > 0, rng.integers(0, V, (B, T)), 0).astype(np.int32), w=w)


def _mlm_case(fn, differentiable):
  valid = lambda a: a["w"] > 0
  return Case(fn.__name__, lambda x, a: fn(x, a["ids"], a["w"]), _mlm_make, valid, "w",
              _bad_labels("ids", valid), differentiable=differentiable)


def _nsp_case():
  make = lambda rng: (_normal(rng, B, 2), dict(
      labels=rng.integers(0, 2, (B,)).astype(np.int32), mask=rng.random((B,)) < 0.7))
  valid = lambda a: a["mask"]
  return Case("nsp", lambda x, a: losses.nsp_loss(x, a["labels"], a["mask"]), make, valid,
              "mask", _bad_labels("labels", valid))


def _feature_make(rng, n_x):
  xs = tuple(_normal(rng, B, T, F) for _ in range(n_x))
  return xs, dict(target=_normal(rng, B, T, F), mask=rng.random((B, T, F)) < 0.6)


def _feature_case(name, fn, n_x, mode):
  return Case(
      f"{name}-{mode}", lambda x, a: fn(*x, a["target"], a["mask"], mode=mode),
      functools.partial(_feature_make, n_x=n_x), lambda a: a["mask"], "mask",
      lambda a, rng: dict(a, target=np.where(a["mask"], a["target"], np.nan).astype(np.float32)),
      mode=mode)


CLASS_WEIGHTS = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)


def _dense_case(mode):
  def make(rng):
    labels = np.where(rng.random((B, H, W)) < 0.2, 255, rng.integers(0, C, (B, H, W)))
    return _normal(rng, B, H, W, C), dict(labels=labels.astype(np.int32),
                                          keep=rng.random((B, H, W)) < 0.7)
  return Case(
      f"dense-{mode}",
      lambda x, a: losses.dense_xent(x, a["labels"], class_weights=CLASS_WEIGHTS, keep=a["keep"],
                                     mode=mode),
      make, lambda a: a["keep"] & (a["labels"] != 255), "keep",
      _bad_labels("labels", lambda a: a["keep"]), mode=mode)  # 255 stays 255 where kept


CASES = (
    [_xent_case(m) for m in losses.MODES] + [_xent_case("sequence_mean", ls=0.1)]
    + [_xent_ignore_weights_case(), _nsp_case()]
    + [dataclasses.replace(_xent_case("token_mean"), name="masked_accuracy", differentiable=False,
                           loss=lambda x, a: losses.masked_accuracy(x, a["labels"], a["mask"]))]
    + [_mlm_case(losses.mlm_loss, True), _mlm_case(losses.mlm_accuracy, False)]
    + [_feature_case("mse", losses.masked_mse, 1, m) for m in losses.MODES]
    + [_feature_case("gauss", losses.masked_gaussian_nll, 2, m)
       for m in ("token_mean", "sequence_mean")]
    + [_dense_case(m) for m in losses.MODES])
CASE_IDS = [c.name for c in CASES]


@functools.cache
def value_and_grad(case):
  """Jitted (total, weight, grad of safe_div(total, weight) wrt x or None)."""
  def f(x, aux):
    grad = jax.grad(lambda x_: losses.safe_div(*case.loss(x_, aux)))
    return *case.loss(x, aux), (grad(x) if case.differentiable else None)
  return jax.jit(f)


@functools.cache
def microbatch_value_and_grad(case, split):
  """Jitted objective from the rows [:split] and [split:] summed as pairs, divided once."""
  def objective(x, aux):
    parts = [jax.tree.map(lambda a: a[sl], (x, aux))
             for sl in (slice(None, split), slice(split, None))]
    pairs = [case.loss(*p) for p in parts]
    return losses.safe_div(sum(p[0] for p in pairs), sum(p[1] for p in pairs))
  if case.differentiable:
    return jax.jit(jax.value_and_grad(objective))
  return jax.jit(lambda x, aux: (objective(x, aux), None))


def _with_garbage(case, x, aux, g, rng):
  return jax.tree.map(lambda a, m: np.where(m, np.float32(g), a), x, case.masked(x, aux)), \
      case.garbage(aux, rng)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@PROP
@given(seed=SEEDS)
def test_garbage_at_masked_positions_never_leaks(case, seed):
  rng = np.random.default_rng(seed)
  x, aux = case.make(rng)
  total, weight, grads = value_and_grad(case)(x, aux)
  for g in GARBAGE:
    x2, aux2 = _with_garbage(case, x, aux, g, rng)
    total2, weight2, grads2 = value_and_grad(case)(x2, aux2)
    np.testing.assert_allclose(total2, total, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(weight2, weight)
    if case.differentiable:
      jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                   grads2, grads)
      for gr, m in zip(jax.tree.leaves(grads2), jax.tree.leaves(case.masked(x, aux))):
        assert np.all(np.isfinite(gr)) and np.all(np.where(m, gr, 0) == 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_empty_mask_gives_exact_zero_and_zero_grads(case):
  rng = np.random.default_rng(0)
  x, aux = case.make(rng)
  aux = case.empty(aux)
  x = jax.tree.map(lambda a: np.full_like(a, np.nan), x)  # everything is masked, so may be NaN
  total, weight, grads = value_and_grad(case)(x, case.garbage(aux, rng))
  assert float(total) == 0.0
  # full_mean counts padding by definition (that is why it is wrong); every other weight is 0.
  assert (float(weight) > 0) if case.mode == "full_mean" else (float(weight) == 0.0)
  assert float(losses.safe_div(total, weight)) == 0.0
  if case.differentiable:
    jax.tree.map(lambda gr: np.testing.assert_array_equal(gr, 0), grads)


@pytest.mark.parametrize("case", [c for c in CASES if c.mode != "full_mean"],
                         ids=[c.name for c in CASES if c.mode != "full_mean"])
@PROP
@given(seed=SEEDS)
def test_extra_fully_masked_rows_change_nothing(case, seed):
  rng = np.random.default_rng(seed)
  x, aux = case.make(rng)
  x_pad, aux_pad = case.make(rng)
  x_pad, aux_pad = _with_garbage(case, x_pad, case.empty(aux_pad), np.nan, rng)
  x_big, aux_big = jax.tree.map(lambda a, b: np.concatenate([a, b]), (x, aux), (x_pad, aux_pad))
  total, weight, grads = value_and_grad(case)(x, aux)
  total2, weight2, grads2 = value_and_grad(case)(x_big, aux_big)
  np.testing.assert_allclose(total2, total, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(weight2, weight)
  if case.differentiable:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b[:B], a, rtol=1e-6, atol=1e-7),
                 grads, grads2)
    jax.tree.map(lambda b: np.testing.assert_array_equal(b[B:], 0), grads2)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@PROP
@given(seed=SEEDS)
def test_microbatch_sums_then_one_division_equal_full_batch(case, seed):
  rng = np.random.default_rng(seed)
  x, aux = case.make(rng)
  total, weight, grads = value_and_grad(case)(x, aux)
  value, grads_mb = microbatch_value_and_grad(case, 1)(x, aux)  # uneven split: 1 + 3 rows
  np.testing.assert_allclose(value, losses.safe_div(total, weight), rtol=1e-5, atol=1e-6)
  if case.differentiable:
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 grads_mb, grads)


def test_mean_of_microbatch_means_is_not_the_full_batch_mean():
  """The bug the pair contract prevents (transformers#24725): averaging per-batch means."""
  case = _xent_case("token_mean")
  x, aux = case.make(np.random.default_rng(3))
  aux["mask"][0] = [True, False, False, False, False]
  aux["mask"][1:] = True
  halves = [case.loss(x[s], {k: v[s] for k, v in aux.items()}) for s in (slice(0, 1), slice(1, B))]
  mean_of_means = np.mean([losses.safe_div(*p) for p in halves])
  assert abs(mean_of_means - losses.safe_div(*case.loss(x, aux))) > 1e-3


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jit_equals_eager(case):
  x, aux = case.make(np.random.default_rng(1))
  total, weight, _ = value_and_grad(case)(x, aux)
  total_e, weight_e = case.loss(x, aux)
  np.testing.assert_allclose(total_e, total, rtol=1e-6)
  np.testing.assert_array_equal(weight_e, weight)


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
  expected = {"token_mean": (8, 4), "sequence_mean": (4, 2), "batch_mean": (8, 2),
              "full_mean": (8, 9)}
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
  return jax.jit(lambda lo, la, m, w: losses.masked_xent(
      lo, la, m, label_smoothing=ls, ignore_index=-100, weights=w, mode=mode))


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
  np.testing.assert_allclose(losses.nsp_loss(logits, labels, mask),
                             (np_xent(logits, labels)[mask].sum(), 3), rtol=1e-6)
  np.testing.assert_allclose(losses.nsp_loss(logits, labels), (np_xent(logits, labels).sum(), B),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.masked_accuracy(logits, labels, mask),
                             ((logits.argmax(-1) == labels)[mask].sum(), 3))


@pytest.mark.parametrize("mode", losses.MODES)
def test_mse_and_gaussian_nll_match_reference(mode):
  rng = np.random.default_rng(0)
  (pred, log_var), aux = _feature_make(rng, 2)
  mask, target = aux["mask"], aux["target"]
  np.testing.assert_allclose(losses.masked_mse(pred, target, mask, mode=mode),
                             np_reduce((pred - target) ** 2, mask, None, mode), rtol=1e-5)
  lv, pr, tg = (a.astype(np.float64) for a in (log_var, pred, target))
  nll = 0.5 * (lv + (tg - pr) ** 2 * np.exp(-lv) + np.log(2 * np.pi))
  np.testing.assert_allclose(losses.masked_gaussian_nll(pred, log_var, target, mask, mode=mode),
                             np_reduce(nll, mask, None, mode), rtol=1e-5)


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
      (6 * np.log(4 / 3) + 4 * np.log(4.0), 10), rtol=1e-6)


@pytest.mark.parametrize("mode", losses.MODES)
def test_dense_xent_matches_float64_reference(mode):
  case = _dense_case(mode)
  logits, aux = case.make(np.random.default_rng(2))
  valid = aux["keep"] & (aux["labels"] != 255)
  w = CLASS_WEIGHTS[np.clip(aux["labels"], 0, C - 1)]
  np.testing.assert_allclose(case.loss(logits, aux),
                             np_reduce(np_xent(logits, aux["labels"]), valid, w, mode), rtol=1e-5)


def test_class_weights_from_counts():
  counts = np.array([10.0, 30.0, 0.0, 60.0])
  # freq = [.1, .3, -, .6]; median over present classes = .3; K = 3 present classes.
  np.testing.assert_allclose(losses.class_weights_from_counts(counts, method="median"),
                             [3.0, 1.0, 0.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(losses.class_weights_from_counts(counts, method="inverse"),
                             [10 / 3, 10 / 9, 0.0, 5 / 9], rtol=1e-6)
  inv = losses.class_weights_from_counts(counts)
  np.testing.assert_allclose((counts * inv).sum() / counts.sum(), 1.0, rtol=1e-6)
  # Eigen & Fergus: frequency within the images where the class is present; even K -> mean of
  # the two middle frequencies: freq = [.1, .6, .6, .2], median = .4.
  got = losses.class_weights_from_counts(np.array([10.0, 30.0, 60.0, 20.0]), method="median",
                                         present_pixels=np.array([100.0, 50.0, 100.0, 100.0]))
  np.testing.assert_allclose(got, [4.0, 2 / 3, 2 / 3, 2.0], rtol=1e-6)


_Z = dict(logits=np.zeros((2, 3, 4)), labels=np.zeros((2, 3), np.int32), mask=np.ones((2, 3), bool))


@pytest.mark.parametrize("match, call", [
    ("mode", lambda: losses.masked_xent(**_Z, mode="mean")),
    ("labels", lambda: losses.masked_xent(**dict(_Z, labels=_Z["labels"] * 1.0))),
    ("logits", lambda: losses.masked_xent(**dict(_Z, logits=_Z["logits"][:, :2]))),
    ("mask", lambda: losses.masked_xent(**dict(_Z, mask=_Z["mask"] * 1.0))),
    ("label_smoothing", lambda: losses.masked_xent(**_Z, label_smoothing=1.0)),
    ("class_weights", lambda: losses.dense_xent(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2), int),
                                                class_weights=np.ones(2))),
    ("method", lambda: losses.class_weights_from_counts(np.ones(3), method="log")),
    ("mask", lambda: losses.masked_mse(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 2), bool))),
])
def test_bad_arguments_raise_named_errors(match, call):
  with pytest.raises(ValueError, match=match):
    call()
