"""Build and convert masks: lengths <-> step masks, value masks, feature masks.

A mask is a `bool` array, True = this element counts. Masks are built here, once, where data
enters, and passed down explicitly. Every function accepts any number of leading batch dims
(written `...`). Value checks (ranges, right padding) run only on concrete arrays: under `jit`
the values are unknown, so the checks are skipped there and documented as such.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(x) -> np.ndarray | None:
  """The value of `x` as NumPy, or None when `x` is traced (inside jit/grad/vmap)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _time_index(ndim: int, T: int) -> jax.Array:
  """`arange(T)` reshaped to `i32[1, ..., 1, T]` (ndim + 1 dims), since rank promotion is off."""
  return jnp.arange(T, dtype=jnp.int32).reshape((1,) * ndim + (T,))


def check_lengths(lengths, T: int):
  """Checks that `lengths` are integers with `0 <= length <= T`; returns them unchanged.

  lengths: i32[...]. The dtype is always checked; the range only when `lengths` is concrete
  (under jit an out-of-range length cannot raise; `sequence_mask` then treats a negative length
  as 0 and a length above T as T).
  """
  if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
    raise ValueError(
      f"lengths must be an integer array, got dtype {jnp.result_type(lengths)}; pass"
      " lengths.astype(jnp.int32)."
    )
  values = _concrete(lengths)
  if values is not None and values.size:
    bad = np.argwhere((values < 0) | (values > T))
    if bad.size:
      where = tuple(int(i) for i in bad[0])
      raise ValueError(
        f"lengths must satisfy 0 <= length <= T={T}; lengths{list(where)} ="
        f" {values[where]}. Pad the inputs to a longer T or clip the lengths."
      )
  return lengths


def sequence_mask(lengths, T: int) -> jax.Array:
  """Step mask of a right-padded batch: True for `t < length`.

  lengths: i32[...]; returns bool[..., T]. No range check (see `check_lengths`).
  """
  lengths = jnp.asarray(lengths)
  return _time_index(lengths.ndim, T) < lengths[..., None]


def lengths_from_mask(mask, *, check_right_padded: bool = False) -> jax.Array:
  """Number of True steps per row of a step mask.

  mask: bool[..., T]; returns i32[...]. This is the length only for a right-padded mask
  (True...True False...False). With `check_right_padded=True` and a concrete mask, a mask with
  holes or left padding raises a ValueError naming the first offending row; under jit the
  check is skipped (pass the lengths themselves, or check before jitting).
  """
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be bool, got {mask.dtype}; build it with a comparison.")
  lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  values = _concrete(mask) if check_right_padded else None
  if values is not None and values.size:
    n = values.sum(axis=-1)
    expected = np.arange(values.shape[-1]) < n[..., None]
    bad = np.argwhere(np.any(values != expected, axis=-1))
    if bad.size:
      row = tuple(int(i) for i in bad[0])
      raise ValueError(
        f"mask{list(row)} = {values[row].astype(int).tolist()} is not right-padded (True"
        " steps must come first), so a length cannot describe it. Use the step mask itself"
        " (scan accepts masks with holes) or fix the padding side."
      )
  return lengths


def mask_from_value(x, value=0.0) -> jax.Array:
  """Keras `Masking` rule: a step is masked only if ALL its features equal `value`.

  x: f32[..., T, F]; returns bool[..., T] (True = the step counts).

  Warning: this infers padding from the data, so a real step whose features all happen to
  equal `value` is masked too: with the default 0.0, a black RGB pixel or a sensor reading of
  exactly zero silently disappears. Prefer a mask built from lengths or a missing-value
  indicator; use this only where the data's own padding convention is a value.

  NaN `value`: `x == nan` is False everywhere, so Keras' rule would never mask anything. Here
  NaN matches NaN instead, so `value=jnp.nan` masks steps whose features are all NaN (a common
  missing-step marker). A step with only some NaN features still counts.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"x must be [..., T, F] (at least 2 dims), got shape {x.shape}.")
  value = jnp.asarray(value, dtype=x.dtype)
  same = (x == value) | (jnp.isnan(x) & jnp.isnan(value))
  return ~jnp.all(same, axis=-1)


def step_mask_from_feature_mask(fmask, *, rule: str = "any") -> jax.Array:
  """Step mask from a feature (validity) mask.

  fmask: bool[..., T, F] (True = feature observed); returns bool[..., T].
  rule='any' (default): a step counts if at least one feature is observed; a step with nothing
  observed is a missing step (the padded scan freezes the carry there). rule='all': a step
  counts only if every feature is observed (complete-case analysis).
  """
  fmask = jnp.asarray(fmask)
  if fmask.dtype != jnp.bool_ or fmask.ndim < 2:
    raise ValueError(f"fmask must be bool[..., T, F], got {fmask.dtype}{list(fmask.shape)}.")
  if rule == "any":
    return jnp.any(fmask, axis=-1)
  if rule == "all":
    return jnp.all(fmask, axis=-1)
  raise ValueError(f"rule must be 'any' or 'all', got {rule!r}.")


def pad_to(x, T: int, *, axis: int = -1, value=0) -> jax.Array:
  """Pads `x` along `axis` at the end (right padding) up to length T.

  x: [..., T0, ...] with T0 <= T along `axis`; returns the same with T there. Pass axis=-2 for
  features f32[..., T, F]. Padding with `value` builds no mask: pad the mask (with False) too.
  """
  x = jnp.asarray(x)
  axis = axis % x.ndim
  size = x.shape[axis]
  if size > T:
    raise ValueError(f"x has length {size} along axis {axis}, longer than T={T}; crop it first.")
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, T - size)
  return jnp.pad(x, widths, constant_values=jnp.asarray(value, dtype=x.dtype))
