"""Mask-aware layers: batch norm, 1-D convolution and pooling that only see valid positions.

A layer is padding invariant when appending padded steps (holding anything, NaN included) leaves
its outputs at valid steps, its gradients and its running statistics unchanged. Plain
`nn.BatchNorm` breaks this (padding enters the batch statistics) and so does plain `nn.Conv`
(a kernel near the end of a sequence reads the padding). The layers here keep it: they put a
safe value at invalid positions before computing anything, and re-mask their outputs to zero so
that the next layer sees zeros there. Elementwise ops (ReLU, GELU) need only `remask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_mask(x, mask, x_name="x"):
  if mask.dtype != jnp.bool_:
    raise ValueError(
      f"mask must be bool (True = counts), got {mask.dtype}; build it from"
      " lengths, e.g. `jnp.arange(T) < lengths[:, None]`."
    )
  if mask.shape != x.shape[:-1]:
    raise ValueError(
      f"mask shape {mask.shape} must equal {x_name}.shape[:-1] = {x.shape[:-1]}"
      " (one flag per position, shared by all features)."
    )


def masked_moments(x, mask, axes: Sequence[int]):
  """Biased mean and variance of each feature over the valid positions only.

  x: f32[..., F]; mask: bool[...] (= x.shape[:-1]); axes: axes of x to reduce, not the last.
  Returns (mean, var): f32 arrays shaped like x without `axes` (f32[F] when every axis but the
  last is reduced). Where no position is valid both are 0 (not NaN); masked entries of x get
  exactly zero gradient.
  """
  x = jnp.asarray(x)
  mask = jnp.asarray(mask)
  _check_mask(x, mask)
  axes = tuple(sorted(a % x.ndim for a in axes))
  if x.ndim - 1 in axes:
    raise ValueError(
      f"axes {axes} must not include the feature axis {x.ndim - 1}; moments are per feature."
    )
  m = mask[..., None]
  x = jnp.where(m, x, 0.0)  # safe value first: NaN/inf padding must not reach the sums
  count = jnp.sum(m, axis=axes, dtype=x.dtype)
  denom = jnp.maximum(count, 1.0)  # empty -> 0 / 1 = 0, not 0 / 0
  mean = jnp.sum(x, axis=axes) / denom
  # Two-pass variance: E[x^2] - E[x]^2 cancels badly for large means (flax's use_fast_variance).
  centered = jnp.where(m, x - jnp.expand_dims(mean, axes), 0.0)
  var = jnp.sum(jnp.square(centered), axis=axes) / denom
  return mean, var


def remask(x, mask, value=0.0):
  """Puts `value` at invalid positions; use it after any elementwise op (ReLU, GELU).

  x: f32[..., F] with mask bool[...] (= x.shape[:-1]), or x and mask of the same shape.
  Returns an array shaped like x. A `jnp.where`, so NaN at invalid positions neither shows
  nor sends NaN gradients back.
  """
  x = jnp.asarray(x)
  mask = jnp.asarray(mask)
  if mask.shape == x.shape:
    m = mask
  else:
    _check_mask(x, mask)
    m = mask[..., None]
  return jnp.where(m, x, jnp.asarray(value, x.dtype))


def masked_mean_pool(x, mask):
  """Mean over valid time steps; 0 for a sequence with no valid step.

  x: f32[..., T, F]; mask: bool[..., T]. Returns f32[..., F].
  """
  x = jnp.asarray(x)
  mask = jnp.asarray(mask)
  _check_mask(x, mask)
  m = mask[..., None]
  total = jnp.sum(jnp.where(m, x, 0.0), axis=-2)
  count = jnp.sum(m, axis=-2, dtype=x.dtype)
  return total / jnp.maximum(count, 1.0)


def masked_max_pool(x, mask):
  """Max over valid time steps; 0 (not -inf) for a sequence with no valid step.

  x: f32[..., T, F]; mask: bool[..., T]. Returns f32[..., F].
  """
  x = jnp.asarray(x)
  mask = jnp.asarray(mask)
  _check_mask(x, mask)
  m = mask[..., None]
  pooled = jnp.max(jnp.where(m, x, -jnp.inf), axis=-2)
  return jnp.where(jnp.any(m, axis=-2), pooled, 0.0)


class MaskedBatchNorm(nn.Module):
  """Batch norm whose batch and running statistics cover valid positions only.

  Like `flax.linen.BatchNorm` over features (last axis), with the same `batch_stats`
  variables `mean` and `var` (biased variance, as flax) and the same momentum rule
  `ra = momentum * ra + (1 - momentum) * batch`. A batch with no valid position leaves the
  running statistics unchanged (flax's own `mask=` argument turns them into NaN), and they are
  not updated while initialising. Outputs at invalid positions are 0.

  Under `jit` with a data-parallel sharding the statistics are already global; no `axis_name`
  is needed.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: nn.initializers.Initializer = nn.initializers.ones
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, mask, *, use_running_average: bool | None = None):
    """Normalises x with statistics over the valid positions of the batch.

    x: f32[B, T, F]; mask: bool[B, T]. Returns f32[B, T, F], zero where mask is False.
    """
    use_running_average = nn.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    x = jnp.asarray(x)
    mask = jnp.asarray(mask)
    _check_mask(x, mask)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    m = mask[..., None]
    x = jnp.where(m, x, 0.0)  # NaN padding would leak into gradients through (x - mean) * scale

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = masked_moments(x, mask, tuple(range(x.ndim - 1)))
      if not self.is_initializing():
        any_valid = jnp.any(mask)
        new_mean = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        new_var = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        ra_mean.value = jnp.where(any_valid, new_mean, ra_mean.value)
        ra_var.value = jnp.where(any_valid, new_var, ra_var.value)

    per_feature = lambda v: jnp.reshape(v, (1,) * (x.ndim - 1) + (features,))
    y = (x - per_feature(mean)) * per_feature(jax.lax.rsqrt(var + self.epsilon))
    if self.use_scale:
      y = y * per_feature(self.param("scale", self.scale_init, (features,), jnp.float32))
    if self.use_bias:
      y = y + per_feature(self.param("bias", self.bias_init, (features,), jnp.float32))
    return jnp.where(m, y, 0.0)


class MaskedConv1D(nn.Module):
  """1-D convolution over time that reads zeros at invalid steps and writes zeros there.

  `padding` is 'SAME' (centred kernel) or 'CAUSAL' (output t sees inputs <= t). With a
  right-padded mask the valid outputs equal those of the unpadded sequence under zero padding;
  a hole inside a sequence is read as a zero step.
  """

  features: int
  kernel_size: int
  padding: str = "SAME"
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, mask):
    """Convolves the valid steps of x.

    x: f32[B, T, F]; mask: bool[B, T]. Returns f32[B, T, features], zero where mask is False.
    """
    if self.padding not in ("SAME", "CAUSAL"):
      raise ValueError(f"padding must be 'SAME' or 'CAUSAL', got {self.padding!r}.")
    x = jnp.asarray(x)
    mask = jnp.asarray(mask)
    _check_mask(x, mask)
    m = mask[..., None]
    x = jnp.where(m, x, 0.0)
    y = nn.Conv(
      self.features,
      (self.kernel_size,),
      padding=self.padding,
      use_bias=self.use_bias,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      name="conv",
    )(x)
    return jnp.where(
      m, y, 0.0
    )  # the bias (and kernels reading valid neighbours) would fill padding
