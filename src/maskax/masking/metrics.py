"""Segmentation metrics from a confusion matrix (Long, Shelhamer & Darrell 2015, §4).

With n_ij the number of pixels of class i predicted as class j and t_i = sum_j n_ij:
  pixel accuracy      sum_i n_ii / sum_i t_i
  mean accuracy       mean_i n_ii / t_i
  mean IU             mean_i n_ii / (t_i + sum_j n_ji - n_ii)
  frequency-weighted  (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
The confusion matrix is built on device (jit-able, summable over batches and devices); the
scores are computed once on the host in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


def _check_concrete_range(name, x, num_classes, ignore_label):
  """Value check, only when `x` is concrete (outside jit)."""
  if isinstance(x, jax.core.Tracer):
    return
  x = np.asarray(x)
  bad = (
    (x != ignore_label) & ((x < 0) | (x >= num_classes))
    if ignore_label is not None
    else ((x < 0) | (x >= num_classes))
  )
  if bad.any():
    allowed = f"[0, {num_classes})" + ("" if ignore_label is None else f" or {ignore_label}")
    raise ValueError(
      f"{name} holds values outside {allowed}, e.g. {np.unique(x[bad])[:5]}; check num_classes."
    )


def confusion_matrix(pred, labels, num_classes, *, ignore_label=IGNORE_LABEL):
  """Counts pixels of true class i predicted as class j.

  Pixels whose label is `ignore_label` never count. Under jit, labels or predictions outside
  [0, num_classes) cannot be checked and are dropped; outside jit they raise ValueError.

  Counts are exact while each cell stays below 2**24 per call (a float32 matmul of one-hot
  rows, which runs on the matrix units of GPU/TPU where a scatter-add would serialise on
  C*C addresses); sum the int32 results over batches.

  Args:
    pred: int[...] predicted classes, e.g. `argmax(logits, -1)`.
    labels: int[...] true classes or `ignore_label`, same shape as `pred`.
  Returns:
    i32[C, C], rows = true class, columns = predicted class.
  """
  if pred.shape != labels.shape:
    raise ValueError(f"pred {pred.shape} and labels {labels.shape} must have the same shape.")
  if not (jnp.issubdtype(pred.dtype, jnp.integer) and jnp.issubdtype(labels.dtype, jnp.integer)):
    raise ValueError(
      f"pred and labels must be integer class ids, got {pred.dtype} and {labels.dtype}; "
      "take argmax of the logits first."
    )
  _check_concrete_range("pred", pred, num_classes, None)
  _check_concrete_range("labels", labels, num_classes, ignore_label)
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  pred = jnp.asarray(pred, jnp.int32).reshape(-1)
  # one_hot of an out-of-range index is an all-zero row, so ignored pixels add nothing.
  labels = jnp.where(labels == ignore_label, -1, labels)
  true_1h = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  pred_1h = jax.nn.one_hot(pred, num_classes, dtype=jnp.float32)
  counts = jnp.einsum("nc,nd->cd", true_1h, pred_1h, precision=jax.lax.Precision.HIGHEST)
  return jnp.round(counts).astype(jnp.int32)


def class_iou(confusion):
  """Per-class intersection over union; NaN for classes absent from truth and prediction.

  Args:
    confusion: int[C, C] (rows true, columns predicted).
  Returns:
    f64[C].
  """
  n = np.asarray(confusion, np.float64)
  inter = np.diag(n)
  union = n.sum(1) + n.sum(0) - inter
  safe = np.where(union > 0, union, 1.0)
  return np.where(union > 0, inter / safe, np.nan)


def segmentation_scores(confusion):
  """The four scores of Long et al. (2015, §4) from a summed confusion matrix.

  Convention for absent classes: a class absent from both ground truth and prediction is left
  out of the means (it says nothing about the model). A class that is predicted but absent
  from the ground truth has IoU 0 and counts in mean IU; its accuracy n_ii / t_i is undefined,
  so mean accuracy averages over the classes present in the ground truth only.

  Args:
    confusion: int[C, C] (rows true, columns predicted), e.g. summed `confusion_matrix`.
  Returns:
    dict of Python floats: pixel_acc, mean_acc, mean_iou, fw_iou.
  """
  n = np.asarray(confusion, np.float64)
  if n.ndim != 2 or n.shape[0] != n.shape[1]:
    raise ValueError(f"confusion must be a square [C, C] matrix, got shape {n.shape}.")
  total = n.sum()
  if total <= 0:
    raise ValueError("confusion matrix is empty (no labelled pixels); nothing to score.")
  inter = np.diag(n)
  truth = n.sum(1)
  iou = class_iou(n)
  in_truth = truth > 0
  return {
    "pixel_acc": float(inter.sum() / total),
    "mean_acc": float(np.mean(inter[in_truth] / truth[in_truth])),
    "mean_iou": float(np.nanmean(iou)),
    "fw_iou": float(np.sum(truth[in_truth] * iou[in_truth]) / total),
  }
