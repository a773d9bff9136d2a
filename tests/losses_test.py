"""Tests for maskax.masking.losses: the mask contract for every loss (garbage, empty masks, micro-batches)."""

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maskax.masking import losses

B, T, V, F, H, W, C = 4, 5, 7, 3, 3, 4, 5
GARBAGE = (np.nan, np.inf, -np.inf, 1e30)
BAD_LABELS = np.array([-1, -(2**31), V, 10**6], np.int32)
SEEDS = st.integers(0, 2**31 - 1)
PROP = settings(max_examples=20, deadline=None)


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
      lambda a: np.broadcast_to(
        invalid.reshape(invalid.shape + (1,) * (a.ndim - invalid.ndim)), a.shape
      ),
      x,
    )

  def empty(self, aux):
    return dict(aux, **{self.mask_key: np.zeros_like(aux[self.mask_key])})


def _normal(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def _bad_labels(key, valid):
  """aux -> aux with out-of-range and negative labels wherever `valid(aux)` is False."""
  return lambda a, rng: dict(
    a, **{key: np.where(valid(a), a[key], rng.choice(BAD_LABELS, a[key].shape))}
  )


def _xent_case(mode, ls=0.0):
  make = lambda rng: (
    _normal(rng, B, T, V),
    dict(labels=rng.integers(0, V, (B, T)).astype(np.int32), mask=rng.random((B, T)) < 0.6),
  )
  valid = lambda a: a["mask"]
  return Case(
    f"xent-{mode}-ls{ls}",
    lambda x, a: losses.masked_xent(x, a["labels"], a["mask"], label_smoothing=ls, mode=mode),
    make,
    valid,
    "mask",
    _bad_labels("labels", valid),
    mode=mode,
  )


def _xent_ignore_weights_case():
  def make(rng):
    labels = np.where(rng.random((B, T)) < 0.2, -100, rng.integers(0, V, (B, T)))
    return _normal(rng, B, T, V), dict(
      labels=labels.astype(np.int32), w=_normal(rng, B, T) ** 2, mask=rng.random((B, T)) < 0.7
    )

  valid = lambda a: a["mask"] & (a["labels"] != -100)
  return Case(
    "xent-ignore-weights",
    lambda x, a: losses.masked_xent(x, a["labels"], a["mask"], ignore_index=-100, weights=a["w"]),
    make,
    valid,
    "mask",
    lambda a, rng: dict(a, w=np.where(valid(a), a["w"], np.nan).astype(np.float32)),
  )


def _mlm_make(rng):
  w = (rng.random((B, T)) < 0.6).astype(np.float32)
  return _normal(rng, B, T, V), dict(
    ids=np.where(w > 0, rng.integers(0, V, (B, T)), 0).astype(np.int32), w=w
  )


def _mlm_case(fn, differentiable):
  valid = lambda a: a["w"] > 0
  return Case(
    fn.__name__,
    lambda x, a: fn(x, a["ids"], a["w"]),
    _mlm_make,
    valid,
    "w",
    _bad_labels("ids", valid),
    differentiable=differentiable,
  )


def _nsp_case():
  make = lambda rng: (
    _normal(rng, B, 2),
    dict(labels=rng.integers(0, 2, (B,)).astype(np.int32), mask=rng.random((B,)) < 0.7),
  )
  valid = lambda a: a["mask"]
  return Case(
    "nsp",
    lambda x, a: losses.nsp_loss(x, a["labels"], a["mask"]),
    make,
    valid,
    "mask",
    _bad_labels("labels", valid),
  )


def _feature_make(rng, n_x):
  xs = tuple(_normal(rng, B, T, F) for _ in range(n_x))
  return xs, dict(target=_normal(rng, B, T, F), mask=rng.random((B, T, F)) < 0.6)


def _feature_case(name, fn, n_x, mode):
  return Case(
    f"{name}-{mode}",
    lambda x, a: fn(*x, a["target"], a["mask"], mode=mode),
    functools.partial(_feature_make, n_x=n_x),
    lambda a: a["mask"],
    "mask",
    lambda a, rng: dict(a, target=np.where(a["mask"], a["target"], np.nan).astype(np.float32)),
    mode=mode,
  )


CLASS_WEIGHTS = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)


def _dense_case(mode):
  def make(rng):
    labels = np.where(rng.random((B, H, W)) < 0.2, 255, rng.integers(0, C, (B, H, W)))
    return _normal(rng, B, H, W, C), dict(
      labels=labels.astype(np.int32), keep=rng.random((B, H, W)) < 0.7
    )

  return Case(
    f"dense-{mode}",
    lambda x, a: losses.dense_xent(
      x, a["labels"], class_weights=CLASS_WEIGHTS, keep=a["keep"], mode=mode
    ),
    make,
    lambda a: a["keep"] & (a["labels"] != 255),
    "keep",
    _bad_labels("labels", lambda a: a["keep"]),
    mode=mode,
  )  # 255 stays 255 where kept


CASES = (
  [_xent_case(m) for m in losses.MODES]
  + [_xent_case("sequence_mean", ls=0.1)]
  + [_xent_ignore_weights_case(), _nsp_case()]
  + [
    dataclasses.replace(
      _xent_case("token_mean"),
      name="masked_accuracy",
      differentiable=False,
      loss=lambda x, a: losses.masked_accuracy(x, a["labels"], a["mask"]),
    )
  ]
  + [_mlm_case(losses.mlm_loss, True), _mlm_case(losses.mlm_accuracy, False)]
  + [_feature_case("mse", losses.masked_mse, 1, m) for m in losses.MODES]
  + [
    _feature_case("gauss", losses.masked_gaussian_nll, 2, m)
    for m in ("token_mean", "sequence_mean")
  ]
  + [_dense_case(m) for m in losses.MODES]
)
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
    parts = [
      jax.tree.map(lambda a: a[sl], (x, aux)) for sl in (slice(None, split), slice(split, None))
    ]
    pairs = [case.loss(*p) for p in parts]
    return losses.safe_div(sum(p[0] for p in pairs), sum(p[1] for p in pairs))

  if case.differentiable:
    return jax.jit(jax.value_and_grad(objective))
  return jax.jit(lambda x, aux: (objective(x, aux), None))


def _with_garbage(case, x, aux, g, rng):
  return jax.tree.map(
    lambda a, m: np.where(m, np.float32(g), a), x, case.masked(x, aux)
  ), case.garbage(aux, rng)


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
      jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), grads2, grads
      )
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


@pytest.mark.parametrize(
  "case",
  [c for c in CASES if c.mode != "full_mean"],
  ids=[c.name for c in CASES if c.mode != "full_mean"],
)
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
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(b[:B], a, rtol=1e-6, atol=1e-7), grads, grads2
    )
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
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), grads_mb, grads
    )


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
