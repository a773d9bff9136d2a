"""Tests for maskax.masking.masks: lengths <-> masks, value masks, feature masks, checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maskax.masking import masks

T = 6
LEAD = (2, 3)  # two leading batch dims everywhere
PROP = settings(max_examples=25, deadline=None)


@functools.cache
def jitted(name, **kw):
  return jax.jit(functools.partial(getattr(masks, name), **kw))


def lengths_arrays(shape=LEAD):
  n = int(np.prod(shape))
  return st.lists(st.integers(0, T), min_size=n, max_size=n).map(
    lambda v: np.array(v, np.int32).reshape(shape)
  )


@PROP
@given(lengths=lengths_arrays())
def test_sequence_mask_lengths_round_trip(lengths):
  mask = masks.sequence_mask(lengths, T)
  assert mask.shape == LEAD + (T,) and mask.dtype == jnp.bool_
  ref = np.array([[[t < n for t in range(T)] for n in row] for row in lengths])
  np.testing.assert_array_equal(mask, ref)
  np.testing.assert_array_equal(masks.lengths_from_mask(mask, check_right_padded=True), lengths)
  np.testing.assert_array_equal(jitted("sequence_mask", T=T)(lengths), mask)
  np.testing.assert_array_equal(jitted("lengths_from_mask")(mask), lengths)


def test_sequence_mask_any_leading_dims():
  assert masks.sequence_mask(np.int32(2), 4).tolist() == [True, True, False, False]
  np.testing.assert_array_equal(
    masks.sequence_mask(np.zeros((1, 2, 1), np.int32), 3), np.zeros((1, 2, 1, 3), bool)
  )


@PROP
@given(lengths=lengths_arrays(), data=st.data())
def test_non_right_padded_mask_names_first_bad_row(lengths, data):
  mask = np.array(masks.sequence_mask(lengths, T))
  i, j = data.draw(st.integers(0, LEAD[0] - 1)), data.draw(st.integers(0, LEAD[1] - 1))
  if lengths[i, j] >= 2:
    mask[i, j, 0] = False  # a gap before the valid steps
  else:
    mask[i, j, T - 1] = True  # a valid step after padding
  with pytest.raises(ValueError, match=rf"mask\[{i}, {j}\].*not right-padded"):
    masks.lengths_from_mask(mask, check_right_padded=True)
  # Without the check (or under jit, where values are unknown) it just counts.
  np.testing.assert_array_equal(masks.lengths_from_mask(mask), mask.sum(-1))
  np.testing.assert_array_equal(
    jitted("lengths_from_mask", check_right_padded=True)(mask), mask.sum(-1)
  )


def test_first_offending_row_is_reported():
  mask = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]], bool)
  with pytest.raises(ValueError, match=r"mask\[1\] = \[0, 1, 0\]"):
    masks.lengths_from_mask(mask, check_right_padded=True)


def test_check_lengths_out_of_range_and_dtype():
  ok = np.array([[0, T], [3, 1]], np.int32)
  assert masks.check_lengths(ok, T) is ok
  with pytest.raises(ValueError, match=rf"lengths\[1, 0\] = {T + 1}"):
    masks.check_lengths(np.array([[0, T], [T + 1, -1]], np.int32), T)
  with pytest.raises(ValueError, match=r"lengths\[0\] = -2"):
    masks.check_lengths(np.array([-2, 1]), T)
  with pytest.raises(ValueError, match="integer"):
    masks.check_lengths(np.array([1.0, 2.0]), T)
  # Under jit the range is unknown and the check is skipped; the dtype is still checked.
  jax.jit(lambda n: masks.check_lengths(n, T))(np.array([T + 5], np.int32))
  with pytest.raises(ValueError, match="integer"):
    jax.jit(lambda n: masks.check_lengths(n, T))(np.array([1.0]))


def test_mask_from_value_all_features_rule():
  x = np.array(
    [
      [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 5.0]],
      [[5.0, 5.0], [5.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    ],
    np.float32,
  )
  np.testing.assert_array_equal(
    masks.mask_from_value(x), [[False, True, True, True], [True, True, False, False]]
  )
  np.testing.assert_array_equal(
    masks.mask_from_value(x, 5.0), [[True, True, True, False], [False, True, True, True]]
  )
  np.testing.assert_array_equal(jitted("mask_from_value")(x), masks.mask_from_value(x))


def test_mask_from_value_masks_a_real_black_pixel():
  """The documented caveat: a genuine all-zero step is indistinguishable from padding."""
  pixels = np.array([[[0.2, 0.5, 0.1], [0.0, 0.0, 0.0], [0.9, 0.9, 0.9], [0.0, 0.0, 0.0]]])
  lengths = np.array([3])  # the first black pixel (t=1) is real data; t=3 is padding
  inferred = masks.mask_from_value(pixels)
  np.testing.assert_array_equal(inferred, [[True, False, True, False]])
  assert not np.array_equal(inferred, masks.sequence_mask(lengths, 4))


def test_mask_from_value_nan_matches_nan():
  nan = np.nan
  x = np.array([[[nan, nan], [nan, 1.0], [0.0, 0.0]]], np.float32)
  np.testing.assert_array_equal(masks.mask_from_value(x, nan), [[False, True, True]])
  np.testing.assert_array_equal(masks.mask_from_value(x, 0.0), [[True, True, False]])


def test_mask_from_value_leading_dims_and_bad_shape():
  x = np.zeros((2, 3, 4, 5), np.float32)
  x[1, 2, 3, 4] = 1.0
  got = masks.mask_from_value(x)
  assert got.shape == (2, 3, 4) and int(got.sum()) == 1 and bool(got[1, 2, 3])
  with pytest.raises(ValueError, match="x must be"):
    masks.mask_from_value(np.zeros(4))


@PROP
@given(seed=st.integers(0, 2**31 - 1))
def test_step_mask_from_feature_mask_rules(seed):
  fmask = np.random.default_rng(seed).random(LEAD + (T, 3)) < 0.4
  for rule, ref in (("any", fmask.any(-1)), ("all", fmask.all(-1))):
    np.testing.assert_array_equal(masks.step_mask_from_feature_mask(fmask, rule=rule), ref)
    np.testing.assert_array_equal(jitted("step_mask_from_feature_mask", rule=rule)(fmask), ref)
  np.testing.assert_array_equal(
    masks.step_mask_from_feature_mask(fmask), masks.step_mask_from_feature_mask(fmask, rule="any")
  )


def test_step_mask_from_feature_mask_bad_args():
  with pytest.raises(ValueError, match="rule"):
    masks.step_mask_from_feature_mask(np.ones((2, 3), bool), rule="most")
  with pytest.raises(ValueError, match="fmask"):
    masks.step_mask_from_feature_mask(np.ones((2, 3)))


def test_pad_to():
  x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
  got = masks.pad_to(x, 4, axis=-2, value=-1.0)
  assert got.shape == (1, 4, 3)
  np.testing.assert_array_equal(got[:, :2], x)
  np.testing.assert_array_equal(got[:, 2:], -1.0)
  m = masks.pad_to(np.ones((2, 3), bool), 5)
  np.testing.assert_array_equal(masks.lengths_from_mask(m, check_right_padded=True), [3, 3])
  with pytest.raises(ValueError, match="longer than T"):
    masks.pad_to(x, 1, axis=-2)


def test_lengths_from_mask_rejects_non_bool():
  with pytest.raises(ValueError, match="bool"):
    masks.lengths_from_mask(np.ones((2, 3), np.int32))
