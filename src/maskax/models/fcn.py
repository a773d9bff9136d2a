"""A small fully convolutional network (FCN-32s/16s/8s, Long, Shelhamer & Darrell 2015).

VGG-like stages (3x3 conv-ReLU blocks, each stage ending in a 2x2 max pool) give features at
strides 2, 4, ..., 2**S. A 1x1 conv scores the C classes at the coarsest stride; following the
paper's skip architecture (§4.2), scores from finer pools are added after a 2x bilinear
upsampling, down to stride `skips`, and the sum is bilinearly upsampled to the input size. There
are no dense layers, so the same parameters run on any image size.

Besides the net: the per-pixel training loss of the paper's comparison (`LossSpec`,
`pixel_loss`, `make_loss`: full images, loss sampling, class weighting or class-rebalanced
sampling, §3.4 and §4.3), the held-out evaluation at full resolution (`make_eval_sums`,
`eval_finish`: a confusion matrix summed by the training loop's evaluator, finished into the
four scores of §4) and the jitted segmenter used for prediction (`make_segmenter`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskax.data import segmentation
from maskax.masking import losses, metrics, sampling

IGNORE = metrics.IGNORE_LABEL  # label of pixels that count nowhere (void, object borders)
LOSS_MODES = ("full", "loss_sampling", "patchwise", "class_weighted", "class_sampled")


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


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How the training loss counts pixels.

  mode: one of LOSS_MODES (`patchwise` crops the data; its loss is `full`'s).
  normalization: a `losses.MODES` name, for training (evaluation is always token_mean).
  keep_prob, sample_cell: loss_sampling keeps each s x s cell of valid pixels with probability p.
  class_weights / class_keep_probs: C floats (class_weighted / class_sampled), else None.
  """

  mode: str
  normalization: str = "token_mean"
  keep_prob: float = 1.0
  sample_cell: int = 1
  class_weights: tuple[float, ...] | None = None
  class_keep_probs: tuple[float, ...] | None = None


def class_weights(labels, num_classes: int, *, method: str) -> tuple[float, ...]:
  """Class-balancing weights of a training set's labels u8[N, H, W] (`LossSpec.class_weights`).

  'median' (Eigen & Fergus 2015): a class's frequency counts the pixels of the images that hold
  it; 'inverse': over every labelled pixel (`losses.class_weights_from_counts`).
  """
  counts = segmentation.class_frequencies(labels, num_classes, normalize=False)
  present = None
  if method == "median":
    has = np.stack([(labels == c).any(axis=(1, 2)) for c in range(num_classes)])
    per_image = (labels != IGNORE).sum(axis=(1, 2))
    present = (has * per_image[None]).sum(axis=1)
  w = losses.class_weights_from_counts(counts, method=method, present_pixels=present)
  return tuple(float(x) for x in np.asarray(w))


def pixel_loss(logits, labels, key, spec: LossSpec, *, train: bool):
  """Per-pixel cross-entropy terms and metrics as `(total, weight)` pairs.

  logits: f32[B, H, W, C]; labels: i32[B, H, W] (255 = ignore); key: PRNG key (loss sampling).
  Returns (terms, metrics): {'xent'} and {'pixel_acc', 'kept_fraction'}. Out of training (and
  in `full`/`patchwise`) every non-ignored pixel counts with weight 1.
  """
  valid = labels != IGNORE
  keep, weights = None, None
  if train and spec.mode == "loss_sampling":
    if spec.sample_cell == 1:
      keep = sampling.bernoulli_keep(key, valid, spec.keep_prob)
    else:  # one draw per s x s block: closer to dropping a coarse output cell of the net
      b, h, w = labels.shape
      s = spec.sample_cell
      cells = sampling.bernoulli_keep(
        key, jnp.ones((b, -(-h // s), -(-w // s)), bool), spec.keep_prob
      )
      keep = valid & jnp.repeat(jnp.repeat(cells, s, axis=1), s, axis=2)[:, :h, :w]
  elif train and spec.mode == "class_sampled":
    keep = sampling.class_rebalanced_keep(key, labels, valid, jnp.asarray(spec.class_keep_probs))
  if train and spec.mode == "class_weighted":
    weights = jnp.asarray(spec.class_weights, jnp.float32)
  xent = losses.dense_xent(
    logits,
    labels,
    ignore_label=IGNORE,
    class_weights=weights,
    keep=keep,
    mode=spec.normalization if train else "token_mean",
  )
  counted = valid if keep is None else keep
  aux = {
    "pixel_acc": losses.masked_accuracy(logits, labels, valid),
    "kept_fraction": (jnp.sum(counted, dtype=jnp.float32), jnp.sum(valid, dtype=jnp.float32)),
  }
  return {"xent": xent}, aux


def make_loss(model: FCN, spec: LossSpec):
  """The training loop's loss: `(params, model_state, batch, key, *, train) -> (terms,
  metrics, model_state)` over batch {image f32[B, H, W, 3], label u8/i32[B, H, W]}."""

  def loss(params, model_state, batch, key, *, train):
    rngs = {"dropout": jax.random.fold_in(key, 1)} if train and model.config.dropout_rate else {}
    logits = model.apply({"params": params}, batch["image"], train=train, rngs=rngs)
    terms, aux = pixel_loss(logits, batch["label"], key, spec, train=train)
    return terms, aux, model_state

  return loss


def make_eval_sums(model: FCN):
  """Held-out sums at full resolution: the confusion matrix i32[C, C] and the cross-entropy
  pair; `eval_finish` turns the matrix into the four scores of §4 (in float64, on the host).

  Filler rows of the last batch (valid False) become all-ignore, so they count nowhere.
  """

  def eval_sums(params, model_state, batch, key):
    del model_state, key
    valid = batch["valid"][:, None, None]
    labels = jnp.where(valid, batch["label"].astype(jnp.int32), IGNORE)
    logits = model.apply({"params": params}, batch["image"], train=False)
    confusion = metrics.confusion_matrix(jnp.argmax(logits, -1), labels, model.config.num_classes)
    return {"confusion": confusion, "xent": losses.dense_xent(logits, labels, ignore_label=IGNORE)}

  return eval_sums


def eval_finish(sums) -> dict[str, float]:
  """mean_iou, pixel_acc, mean_acc and fw_iou from the summed confusion matrix."""
  return metrics.segmentation_scores(sums["confusion"])


def make_segmenter(model: FCN):
  """`segment(params, images f32[N, H, W, 3]) -> class ids i32[N, H, W]`, jitted (once per
  image size)."""
  return jax.jit(lambda params, x: jnp.argmax(model.apply({"params": params}, x, train=False), -1))
