"""Masked and weighted losses that return `(total, weight)`, with named normalisations.

Every loss returns two f32 scalars. The caller sums them over micro-batches and devices and
divides once with `safe_div(total, weight)`; because every normalisation below keeps both
parts additive over the leading (row) axis, that equals the loss of one big batch, gradients
included (transformers#24725 is the bug when a mean of micro-batch means is used instead).

Normalisations (`mode`), over rows `b` (axis 0: sequences, images) and their elements `i`,
with per-element loss `l` and weight `w` (1 unless given; 0 where masked):
  token_mean     total = sum w*l, weight = sum w. Mean over every valid element of the global
                 batch: BERT's MLM (google-research/bert run_pretraining.py), flax lm1b, and
                 PyTorch `CrossEntropyLoss(weight=..., reduction='mean')`.
  sequence_mean  total = sum_b (sum_i w*l / sum_i w), weight = #rows with sum_i w > 0. Mean per
                 sequence, then over sequences: legacy TF seq2seq
                 `sequence_loss_by_example` and danijar's "Variable Sequence Lengths in
                 TensorFlow". The weight counts sequences, not batches, so it stays additive.
  batch_mean     total = sum w*l, weight = #rows with at least one valid element. Caffe's
                 `normalization: BATCH_SIZE` (the FCN default) divides by the batch size N;
                 here a row with nothing valid is treated as padding and not counted, so padding
                 a batch with dummy rows changes nothing (equal to Caffe when every row has a
                 valid element).
  full_mean      total = sum w*l, weight = number of elements, padding included. This is what
                 Keras does with sample weights ('sum_over_batch_size'); it is kept only to
                 show why it is wrong: the loss scale then depends on how much padding the
                 batch happens to have.

Garbage (NaN, inf, out-of-range labels) at masked positions never leaks: inputs are replaced by
a safe value with `jnp.where` before any log/exp/division, and the result is masked again, so
gradients at masked inputs are exactly zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("token_mean", "sequence_mean", "batch_mean", "full_mean")


def safe_div(total, weight):
  """total / weight, and exactly 0 where weight == 0, with finite gradients.

  total, weight: f32[...] (same shape or scalars); returns f32[...]. Double where: the divisor
  is made safe first, otherwise the unused branch's inf/NaN gradient leaks (JAX FAQ, "gradients
  contain NaN where using where").
  """
  ok = weight != 0
  return jnp.where(ok, total / jnp.where(ok, weight, 1.0), 0.0)


def reduce_loss(per_elem, mask, *, mode: str = "token_mean", weights=None):
  """Reduces a per-element loss to `(total, weight)` by a named normalisation (module doc).

  per_elem: f32[B, ...] (axis 0 = rows: sequences or images), mask: bool[B, ...] (same shape),
  weights: f32[B, ...] | None (per-element weights, e.g. class weights; ignored at masked
  positions). Returns (total f32[], weight f32[]). Values at masked positions may be anything.
  """
  per_elem, mask = jnp.asarray(per_elem), jnp.asarray(mask)
  if per_elem.ndim < 1 or per_elem.shape != mask.shape:
    raise ValueError(
      f"per_elem {per_elem.shape} and mask {mask.shape} must have the same shape [B, ...]."
    )
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be bool, got {mask.dtype}.")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  w = jnp.ones(per_elem.shape, jnp.float32) if weights is None else jnp.asarray(weights)
  if w.shape != per_elem.shape:
    raise ValueError(f"weights {w.shape} must have the shape of per_elem {per_elem.shape}.")
  w = jnp.where(mask, w.astype(jnp.float32), 0.0)
  wl = jnp.where(mask, w * per_elem.astype(jnp.float32), 0.0)
  row_axes = tuple(range(1, per_elem.ndim))
  if mode == "sequence_mean":
    row_w = jnp.sum(w, axis=row_axes)
    row_mean = safe_div(jnp.sum(wl, axis=row_axes), row_w)
    return jnp.sum(row_mean), jnp.sum(row_w > 0).astype(jnp.float32)
  total = jnp.sum(wl)
  if mode == "token_mean":
    return total, jnp.sum(w)
  if mode == "batch_mean":
    return total, jnp.sum(jnp.any(mask, axis=row_axes)).astype(jnp.float32)
  return total, jnp.float32(per_elem.size)


def _xent_per_elem(logits, labels, valid, label_smoothing):
  """Cross-entropy per element, finite everywhere; garbage at ~valid replaced first.

  logits: f32[..., V], labels: i32[...], valid: bool[...]; returns f32[...].
  """
  logits = jnp.where(valid[..., None], logits, 0.0).astype(jnp.float32)
  # Labels at masked slots may be negative or >= V (unused BERT slots, ignore ids); class 0 is
  # a safe stand-in whose loss is masked out afterwards, so nothing depends on how the gather
  # treats out-of-range indices (JAX fills NaN, NumPy raises, negative ones wrap).
  labels = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if label_smoothing:
    # Target (1 - a) * onehot + a / V, as optax.smooth_labels and PyTorch label_smoothing.
    smooth = -jnp.mean(logp, axis=-1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
  return jnp.where(valid, nll, 0.0)


def _check_logits_labels(logits, labels, mask):
  if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + [V].")
  if mask is not None and (mask.shape != labels.shape or mask.dtype != jnp.bool_):
    raise ValueError(f"mask must be bool{list(labels.shape)}, got {mask.dtype}{list(mask.shape)}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got {labels.dtype}.")


def masked_xent(
  logits,
  labels,
  mask,
  *,
  label_smoothing: float = 0.0,
  ignore_index=None,
  weights=None,
  mode: str = "token_mean",
):
  """Softmax cross-entropy over valid elements, reduced by `mode`.

  logits: f32[B, ..., V], labels: i32[B, ...], mask: bool[B, ...], weights: f32[B, ...] | None.
  An element counts where `mask` is True and `labels != ignore_index` (when given). Labels at
  other positions may be garbage (negative, >= V); labels at valid positions must be in [0, V)
  (an out-of-range valid label gives a NaN loss, which the train loop's NaN check reports).
  Returns (total f32[], weight f32[]).
  """
  logits, labels, mask = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)
  _check_logits_labels(logits, labels, mask)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
  valid = mask if ignore_index is None else mask & (labels != ignore_index)
  per_elem = _xent_per_elem(logits, labels, valid, label_smoothing)
  return reduce_loss(per_elem, valid, mode=mode, weights=weights)


def masked_accuracy(logits, labels, mask, *, weights=None):
  """Top-1 accuracy as (correct_total, weight) over valid elements.

  logits: f32[..., V], labels: i32[...], mask: bool[...], weights: f32[...] | None.
  Returns (sum w * [argmax == label], sum w), both f32[]. Ties go to the lowest class id.
  """
  logits, labels, mask = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)
  _check_logits_labels(logits, labels, mask)
  pred = jnp.argmax(logits, axis=-1)  # garbage rows give any class; their weight is 0
  w = jnp.ones(labels.shape, jnp.float32) if weights is None else jnp.asarray(weights)
  w = jnp.where(mask, w.astype(jnp.float32), 0.0)
  return jnp.sum(jnp.where(pred == labels, w, 0.0)), jnp.sum(w)


def mlm_loss(logits, label_ids, label_weights):
  """BERT masked-LM loss over gathered prediction slots: (sum w * nll, sum w).

  logits: f32[B, P, V], label_ids: i32[B, P], label_weights: f32[B, P] (1 for a real slot, 0
  for an unused one, whose id and logits may be anything). google-research/bert
  run_pretraining.py returns sum(w * nll) / (sum(w) + 1e-5); we return the pair instead, so the
  mean is over the real slots of the whole global batch (token_mean) and exactly 0 when empty.
  """
  label_weights = jnp.asarray(label_weights)
  mask = label_weights > 0  # False for NaN weights too.
  return masked_xent(logits, label_ids, mask, weights=label_weights, mode="token_mean")


def mlm_accuracy(logits, label_ids, label_weights):
  """Masked-LM accuracy over real prediction slots: (sum w * correct, sum w).

  logits: f32[B, P, V], label_ids: i32[B, P], label_weights: f32[B, P]; returns f32[] twice.
  """
  label_weights = jnp.asarray(label_weights)
  return masked_accuracy(logits, label_ids, label_weights > 0, weights=label_weights)


def mlm_slot_accuracies(logits, batch, mask_id: int) -> dict:
  """Masked-LM accuracy split by what the input showed at each prediction slot.

  80% of slots show [MASK], 10% a random token and 10% the original token. A model that learns
  to copy its input scores on the last kind for free, so `mask_slots` is the honest measure of
  prediction from context. logits: f32[B, P, V] at the slots; batch holds input_ids i32[B, T]
  and masked_lm_positions / masked_lm_ids / masked_lm_weights [B, P]. Returns
  {`mlm_accuracy_<kind>`: (total, weight)}.
  """
  ids, weights = batch["masked_lm_ids"], batch["masked_lm_weights"]
  shown = jnp.take_along_axis(
    batch["input_ids"], batch["masked_lm_positions"], axis=1, mode="clip"
  )  # unused slots (weight 0) may hold any position
  kinds = {"mask_slots": shown == mask_id, "kept_slots": shown == ids}
  kinds["random_slots"] = ~(kinds["mask_slots"] | kinds["kept_slots"])
  return {
    f"mlm_accuracy_{name}": masked_accuracy(logits, ids, kind & (weights > 0), weights=weights)
    for name, kind in kinds.items()
  }


def nsp_loss(logits, labels, mask=None):
  """Next-sentence-prediction loss: (sum of nll over valid examples, #valid examples).

  logits: f32[B, 2], labels: i32[B] (1 = random next segment), mask: bool[B] | None (None =
  every example counts). Returns (total f32[], weight f32[]).
  """
  labels = jnp.asarray(labels)
  mask = jnp.ones(labels.shape, jnp.bool_) if mask is None else mask
  return masked_xent(logits, labels, mask, mode="token_mean")


def _check_same(name_shapes, mask):
  shapes = {n: jnp.shape(a) for n, a in name_shapes.items()}
  if any(s != jnp.shape(mask) for s in shapes.values()) or jnp.result_type(mask) != jnp.bool_:
    raise ValueError(f"{shapes} and mask {jnp.shape(mask)} must share one shape; mask bool.")


def masked_mse(pred, target, mask, *, mode: str = "token_mean"):
  """Squared error over observed entries only, reduced by `mode`.

  pred, target: f32[B, ..., F], mask: bool[B, ..., F] (a feature/validity mask; targets at
  unobserved entries may be NaN). token_mean = mean over observed entries. Returns
  (total f32[], weight f32[]).
  """
  _check_same({"pred": pred, "target": target}, mask)
  diff = jnp.where(mask, pred, 0.0) - jnp.where(mask, target, 0.0)
  return reduce_loss(jnp.square(diff), mask, mode=mode)


def masked_gaussian_nll(mean, log_var, target, mask, *, mode: str = "token_mean"):
  """Gaussian negative log-likelihood over observed entries, reduced by `mode`.

  mean, log_var, target: f32[B, ..., F], mask: bool[B, ..., F]. Per entry
  0.5 * (log_var + (target - mean)^2 * exp(-log_var) + log(2 pi)), i.e. the full NLL (PyTorch
  GaussianNLLLoss(full=True)). Predicting log-variance keeps the variance positive without a
  division. Returns (total f32[], weight f32[]).
  """
  _check_same({"mean": mean, "log_var": log_var, "target": target}, mask)
  lv = jnp.where(mask, log_var, 0.0)
  sq = jnp.square(jnp.where(mask, target, 0.0) - jnp.where(mask, mean, 0.0))
  per_elem = 0.5 * (lv + sq * jnp.exp(-lv) + math.log(2.0 * math.pi))
  return reduce_loss(per_elem, mask, mode=mode)


def dense_xent(
  logits,
  labels,
  *,
  ignore_label: int | None = 255,
  class_weights=None,
  keep=None,
  mode: str = "token_mean",
):
  """Per-pixel cross-entropy for segmentation, reduced by `mode`.

  logits: f32[B, H, W, C], labels: i32[B, H, W], class_weights: f32[C] | None, keep:
  bool[B, H, W] | None (a loss-sampling mask, FCN §3.4; None keeps every pixel). A pixel counts
  if its label != ignore_label (255 = VOC "void") and keep is True. With class weights each
  pixel's loss is multiplied by w[label] and, for token_mean, the weight is the sum of the pixel
  weights: loss = sum w_i l_i / sum w_i, as Caffe and PyTorch
  CrossEntropyLoss(weight=w, reduction='mean'). sequence_mean is then a per-image mean.
  Returns (total f32[], weight f32[]).
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.ndim != 4:
    raise ValueError(f"logits must be f32[B, H, W, C], got shape {logits.shape}.")
  valid = jnp.ones(labels.shape, jnp.bool_) if keep is None else jnp.asarray(keep)
  if ignore_label is not None:
    valid = valid & (labels != ignore_label)
  weights = None
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != logits.shape[-1:]:
      raise ValueError(
        f"class_weights must be f32[C={logits.shape[-1]}], got {class_weights.shape}."
      )
    weights = class_weights[jnp.where(valid, labels, 0)]
  return masked_xent(logits, labels, valid, weights=weights, mode=mode)


def class_weights_from_counts(counts, *, method: str = "inverse", present_pixels=None):
  """Class-balancing weights from per-class pixel counts.

  counts: f32[C] (pixels of each class), present_pixels: f32[C] | None; returns f32[C].
  freq_c = counts_c / present_pixels_c, where present_pixels_c is the number of pixels in the
  images that contain class c (Eigen & Fergus 2015, "Predicting depth, surface normals and
  semantic labels...", §4.3); when None, freq_c = counts_c / sum(counts).
  'inverse': w_c = 1 / (K * freq_c), K = number of classes with a nonzero count (with the
  default freq the pixel-weighted mean weight is then 1). 'median': w_c = median(freq) / freq_c,
  the median over present classes (mean of the two middle ones when K is even).
  A class with zero count gets weight 0: it has no pixels to weigh, and an infinite weight would
  turn any stray label of that class into an inf loss.
  """
  counts = jnp.asarray(counts, jnp.float32)
  if counts.ndim != 1:
    raise ValueError(f"counts must be f32[C], got shape {counts.shape}.")
  denom = jnp.sum(counts) if present_pixels is None else jnp.asarray(present_pixels, jnp.float32)
  present = counts > 0
  freq = jnp.where(present, counts / jnp.where(present, denom, 1.0), 1.0)
  if method == "inverse":
    num = 1.0 / jnp.sum(present).astype(jnp.float32)
  elif method == "median":
    num = jnp.nanmedian(jnp.where(present, freq, jnp.nan))
  else:
    raise ValueError(f"method must be 'inverse' or 'median', got {method!r}.")
  return jnp.where(present, num / freq, 0.0)
