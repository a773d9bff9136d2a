"""A small fully convolutional network (FCN-32s/16s/8s, Long, Shelhamer & Darrell 2015).

VGG-like stages (3x3 conv-ReLU blocks, each stage ending in a 2x2 max pool) give features at
strides 2, 4, ..., 2**S. A 1x1 conv scores the C classes at the coarsest stride; following the
paper's skip architecture (§4.2), scores from finer pools are added after a 2x bilinear
upsampling, down to stride `skips`, and the sum is bilinearly upsampled to the input size. There
are no dense layers, so the same parameters run on any image size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class FCNConfig:
  """Hyperparameters of `FCN`.

  widths: channels of each stage; len(widths) stages give a total stride of 2**len(widths).
  num_classes: C, including the background class.
  skips: stride of the finest scores fused in: 2**len(widths) is FCN-32s with 5 stages (no
    skips), 16 fuses the stride-16 pool (FCN-16s), 8 also the stride-8 pool (FCN-8s).
  convs_per_stage: 3x3 conv-ReLU blocks per stage.
  norm: GroupNorm after each conv (not in the paper; makes training from scratch stable).
  dropout_rate: dropout on the coarsest features in training (the paper drops out fc6/fc7).
  dtype: computation dtype (e.g. bfloat16); parameters and logits stay float32.
  """

  num_classes: int = 6
  widths: tuple[int, ...] = (16, 32, 64, 64, 128)
  skips: int = 8
  convs_per_stage: int = 2
  norm: bool = True
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @property
  def stride(self) -> int:
    return 2 ** len(self.widths)

  def __post_init__(self):
    if not self.widths or any(w <= 0 for w in self.widths):
      raise ValueError(f"widths must be a non-empty tuple of positive ints, got {self.widths}.")
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}.")
    allowed = [2**k for k in range(1, len(self.widths) + 1)]
    if self.skips not in allowed:
      raise ValueError(
        f"skips must be a stride in {allowed} (2**k up to 2**len(widths)), got {self.skips}."
      )


def _upsample(x, height, width):
  """Bilinear resize of f[B, h, w, C] to [B, height, width, C] (half-pixel centres)."""
  # antialias only matters when shrinking; pinned off so upsampling is plain bilinear.
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear", antialias=False)


class FCN(nn.Module):
  """Fully convolutional segmentation net: images f32[B, H, W, 3] -> logits f32[B, H, W, C].

  Any H, W works: the input is zero-padded at the bottom/right up to a multiple of the total
  stride 2**len(widths) and the logits are cropped back, so output H, W equal the input's.
  """

  config: FCNConfig

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images: f32[B, H, W, 3] -> logits f32[B, H, W, C]. Dropout needs rng 'dropout'."""
    cfg = self.config
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, channels], got shape {images.shape}.")
    height, width = images.shape[1:3]
    s = cfg.stride
    # Zero padding instead of FCN's 100 px input padding + crop layers: max pools of 2x2
    # on even sizes keep every stage aligned with the half-pixel bilinear upsampling.
    ph, pw = -height % s, -width % s
    x = jnp.pad(images.astype(cfg.dtype), ((0, 0), (0, ph), (0, pw), (0, 0)))
    he = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

    pools = []
    for i, w in enumerate(cfg.widths):
      for j in range(cfg.convs_per_stage):
        x = nn.Conv(w, (3, 3), dtype=cfg.dtype, kernel_init=he, name=f"conv{i}_{j}")(x)
        if cfg.norm:
          x = nn.GroupNorm(num_groups=math.gcd(w, 8), dtype=cfg.dtype, name=f"norm{i}_{j}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      pools.append(x)  # stride 2**(i + 1)

    x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(pools[-1])
    scores = nn.Conv(cfg.num_classes, (1, 1), dtype=cfg.dtype, name="score")(x)
    num_fused = int(math.log2(cfg.stride // cfg.skips))
    for k in range(num_fused):
      pool = pools[-2 - k]
      # Zero-initialised so the net starts as the coarser FCN (Long et al. 2015, §4.2).
      skip = nn.Conv(
        cfg.num_classes,
        (1, 1),
        dtype=cfg.dtype,
        kernel_init=nn.initializers.zeros,
        name=f"score_skip{k}",
      )(pool)
      scores = _upsample(scores, pool.shape[1], pool.shape[2]) + skip
    logits = _upsample(scores.astype(jnp.float32), height + ph, width + pw)
    return logits[:, :height, :width, :]
