"""Segmentation data: a seeded synthetic shapes set, a folder loader, crops and a resumable iterator.

The synthetic set imitates the statistics that make PASCAL VOC hard for a per-pixel loss: about
three quarters of the pixels are background, classes differ in size and frequency (a thin bar is
both small and rare), and a void band (label 255) runs along object boundaries as in the VOC
annotations. Colour is jittered so that shape and texture, not colour alone, give the class.
"""

from __future__ import annotations

import math
import os

import numpy as np

IGNORE_LABEL = 255

# (shape, relative frequency, size range as a fraction of min(H, W), texture, mean colour).
# Frequencies and sizes are tuned so background covers ~75% of the pixels and class pixel
# shares span ~50x, like VOC's long tail (person vs bottle).
_CLASSES = (
  ("disc", 0.30, (0.13, 0.25), "noise", (0.85, 0.35, 0.30)),
  ("square", 0.25, (0.11, 0.20), "checker", (0.30, 0.70, 0.35)),
  ("triangle", 0.20, (0.16, 0.28), "stripes", (0.30, 0.40, 0.85)),
  ("ring", 0.12, (0.14, 0.22), "flat", (0.85, 0.80, 0.30)),
  ("bar", 0.08, (0.15, 0.28), "diagonal", (0.70, 0.35, 0.80)),
  ("cross", 0.05, (0.10, 0.16), "flat", (0.30, 0.80, 0.80)),
  ("diamond", 0.04, (0.06, 0.10), "checker", (0.95, 0.60, 0.20)),
)
MAX_CLASSES = len(_CLASSES) + 1


def _shape_mask(shape, u, v, r):
  """Inside test in object coordinates. u, v: f32[N, H, W]; r: f32[N, 1, 1] size in pixels."""
  au, av = np.abs(u), np.abs(v)
  if shape == "disc":
    return u * u + v * v <= r * r
  if shape == "square":
    return np.maximum(au, av) <= r
  if shape == "triangle":  # equilateral, circumradius r
    s3 = math.sqrt(3.0)
    return (v >= -r / 2) & (s3 * u + v <= r) & (-s3 * u + v <= r)
  if shape == "ring":
    d2 = u * u + v * v
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
  if shape == "bar":
    return (au <= r) & (av <= np.maximum(0.15 * r, 2.5))
  if shape == "cross":
    w = np.maximum(0.3 * r, 1.5)
    return ((au <= r) & (av <= w)) | ((av <= r) & (au <= w))
  if shape == "diamond":
    return au + av <= r
  raise AssertionError(shape)


def _texture(kind, u, v, rng):
  """Texture in [0, 1] that mixes an object's two colours. u, v: f32[N, H, W] -> f32[N, H, W]."""
  n = u.shape[0]
  period = rng.uniform(3.0, 6.0, size=(n, 1, 1)).astype(np.float32)
  if kind == "stripes":
    return 0.5 + 0.5 * np.sin(2 * np.pi * v / period)
  if kind == "diagonal":
    return 0.5 + 0.5 * np.sin(2 * np.pi * (u + v) / period)
  if kind == "checker":
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
  if kind == "noise":
    return rng.uniform(0.0, 1.0, size=u.shape).astype(np.float32)
  return np.zeros(u.shape, np.float32)  # "flat"


def _smooth_noise(rng, n, height, width, cells=4):
  """Bilinearly upsampled coarse noise (varied backgrounds). Returns f32[N, H, W, 3]."""
  coarse = rng.uniform(-1.0, 1.0, size=(n, cells + 1, cells + 1, 3)).astype(np.float32)
  y = np.linspace(0.0, cells, height, dtype=np.float32)
  x = np.linspace(0.0, cells, width, dtype=np.float32)
  y0 = np.minimum(y.astype(np.int64), cells - 1)
  x0 = np.minimum(x.astype(np.int64), cells - 1)
  fy = (y - y0)[None, :, None, None]
  fx = (x - x0)[None, None, :, None]
  top = coarse[:, y0][:, :, x0] * (1 - fx) + coarse[:, y0][:, :, x0 + 1] * fx
  bot = coarse[:, y0 + 1][:, :, x0] * (1 - fx) + coarse[:, y0 + 1][:, :, x0 + 1] * fx
  return top * (1 - fy) + bot * fy


def _background(rng, n, height, width):
  """Random two-colour linear gradient plus smooth noise. Returns f32[N, H, W, 3]."""
  yy, xx = np.meshgrid(
    np.linspace(-1, 1, height, dtype=np.float32),
    np.linspace(-1, 1, width, dtype=np.float32),
    indexing="ij",
  )
  angle = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
  t = 0.5 + 0.5 * (np.cos(angle) * xx + np.sin(angle) * yy) / math.sqrt(2)
  c1 = rng.uniform(0.0, 1.0, size=(n, 1, 1, 3)).astype(np.float32)
  c2 = rng.uniform(0.0, 1.0, size=(n, 1, 1, 3)).astype(np.float32)
  img = c1 * (1 - t[..., None]) + c2 * t[..., None]
  return img + 0.15 * _smooth_noise(rng, n, height, width)


def _ignore_band(labels, width):
  """Sets pixels within `width` px (city block) of a label change to 255. u8[N, H, W] -> same."""
  h, w = labels.shape[1:]
  padded = np.pad(labels, ((0, 0), (width, width), (width, width)), mode="edge")
  edge = np.zeros(labels.shape, bool)
  for dy in range(-width, width + 1):
    for dx in range(abs(dy) - width, width - abs(dy) + 1):
      shifted = padded[:, width + dy : width + dy + h, width + dx : width + dx + w]
      edge |= shifted != labels
  return np.where(edge, np.uint8(IGNORE_LABEL), labels)


def make_dataset(
  n,
  *,
  height=64,
  width=64,
  seed=0,
  num_classes=6,
  max_objects=5,
  object_prob=0.8,
  ignore_width=1,
  noise_std=0.04,
):
  """Generates `n` synthetic images with shape labels, deterministically from `seed`.

  Classes: 0 background, then disc, square, triangle, ring, bar, cross, diamond (the first
  `num_classes - 1`), in decreasing frequency. Each image gets up to `max_objects` objects
  (each present with probability `object_prob`); later objects occlude earlier ones. Pixels
  within `ignore_width` px of a label change get the ignore label 255 (a band of about
  2 * ignore_width px; 0 disables it).

  Returns:
    images: f32[N, H, W, 3] in [0, 1].
    labels: u8[N, H, W], values in [0, num_classes) or 255.
  """
  if not 2 <= num_classes <= MAX_CLASSES:
    raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}.")
  if n < 0 or height < 8 or width < 8:
    raise ValueError(f"need n >= 0 and height, width >= 8; got {n}, {height}, {width}.")
  rng = np.random.default_rng(seed)
  classes = _CLASSES[: num_classes - 1]
  probs = np.array([c[1] for c in classes]) / sum(c[1] for c in classes)
  side = float(min(height, width))
  yy, xx = np.meshgrid(
    np.arange(height, dtype=np.float32) + 0.5,
    np.arange(width, dtype=np.float32) + 0.5,
    indexing="ij",
  )
  images = _background(rng, n, height, width)
  labels = np.zeros((n, height, width), np.uint8)
  for _ in range(max_objects):
    cls = rng.choice(len(classes), size=n, p=probs)
    present = rng.uniform(size=n) < object_prob
    cy = rng.uniform(0.1, 0.9, size=n).astype(np.float32) * height
    cx = rng.uniform(0.1, 0.9, size=n).astype(np.float32) * width
    angle = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    jitter = rng.uniform(-0.25, 0.25, size=(n, 2, 3)).astype(np.float32)
    size_u = rng.uniform(size=n).astype(np.float32)
    for c, (shape, _, (lo, hi), texture, colour) in enumerate(classes):
      idx = np.nonzero(present & (cls == c))[0]
      if idx.size == 0:
        continue
      dy, dx = yy - cy[idx, None, None], xx - cx[idx, None, None]
      cos, sin = np.cos(angle[idx, None, None]), np.sin(angle[idx, None, None])
      u, v = cos * dx + sin * dy, -sin * dx + cos * dy
      r = ((lo + (hi - lo) * size_u[idx]) * side)[:, None, None]
      inside = _shape_mask(shape, u, v, r)
      # Two colours around the class colour, the second darker: the texture shows as
      # contrast, while jitter keeps colour alone from separating classes.
      base = np.asarray(colour, np.float32) + jitter[idx]
      base[:, 1] *= 0.45
      t = _texture(texture, u, v, rng)[..., None]
      fill = base[:, None, None, 0] * (1 - t) + base[:, None, None, 1] * t
      images[idx] = np.where(inside[..., None], fill, images[idx])
      labels[idx] = np.where(inside, np.uint8(c + 1), labels[idx])
  images += noise_std * rng.standard_normal(images.shape, dtype=np.float32)
  images = np.clip(images, 0.0, 1.0).astype(np.float32)
  if ignore_width > 0:
    labels = _ignore_band(labels, ignore_width)
  return images, labels


def class_frequencies(labels, num_classes, *, ignore_label=IGNORE_LABEL, normalize=True):
  """Per-class pixel share (or count) over non-ignored pixels.

  Args:
    labels: int[...] with values in [0, num_classes) or `ignore_label`.
  Returns:
    f64[C] summing to 1 (all zeros if nothing is labelled), or i64[C] counts if not
    `normalize`.
  """
  labels = np.asarray(labels)
  valid = labels != ignore_label
  bad = valid & ((labels < 0) | (labels >= num_classes))
  if bad.any():
    raise ValueError(
      f"labels hold values outside [0, {num_classes}) other than {ignore_label}: "
      f"{np.unique(labels[bad])[:10]}; pass the right num_classes."
    )
  counts = np.bincount(labels[valid].astype(np.int64).ravel(), minlength=num_classes)
  if not normalize:
    return counts
  total = counts.sum()
  return counts / total if total > 0 else np.zeros(num_classes, np.float64)


def load_folder(path, *, num_classes=None):
  """Loads `path/images/*.png` and `path/labels/*.png` with matching names.

  Label PNGs are palette (VOC style) or greyscale maps of class indices, 255 = ignore. All
  images must share one size (crop or resize them beforehand).

  Returns:
    images: f32[N, H, W, 3] in [0, 1].
    labels: u8[N, H, W].
  """
  from PIL import Image  # Pillow ships with matplotlib; imported here so import stays cheap.

  if not os.path.isdir(path):
    raise ValueError(f"path {path!r} is not a folder; expected images/ and labels/ in it.")
  names = {}
  for sub in ("images", "labels"):
    folder = os.path.join(path, sub)
    if not os.path.isdir(folder):
      raise ValueError(f"missing folder {folder!r}; put the {sub} there as PNG files.")
    names[sub] = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
  if not names["images"]:
    raise ValueError(f"no .png files in {os.path.join(path, 'images')!r}.")
  only_img = sorted(set(names["images"]) - set(names["labels"]))
  only_lab = sorted(set(names["labels"]) - set(names["images"]))
  if only_img or only_lab:
    raise ValueError(
      f"image and label names must match; images without labels: {only_img[:5]}, "
      f"labels without images: {only_lab[:5]}."
    )
  images, labels = [], []
  for name in names["images"]:
    with Image.open(os.path.join(path, "images", name)) as im:
      img = np.asarray(im.convert("RGB"), np.float32) / 255.0
    with Image.open(os.path.join(path, "labels", name)) as im:
      if im.mode not in ("P", "L"):
        raise ValueError(
          f"label {name!r} has PNG mode {im.mode!r}; save labels as palette (P) or "
          "greyscale (L) maps of class indices."
        )
      lab = np.asarray(im, np.uint8)
    if img.shape[:2] != lab.shape:
      raise ValueError(f"{name!r}: image size {img.shape[:2]} != label size {lab.shape}.")
    if images and img.shape != images[0].shape:
      raise ValueError(
        f"{name!r} has size {img.shape[:2]} but {names['images'][0]!r} has "
        f"{images[0].shape[:2]}; all images must share one size (crop or resize them)."
      )
    images.append(img)
    labels.append(lab)
  labels = np.stack(labels)
  if num_classes is not None:
    class_frequencies(labels, num_classes)  # raises on out-of-range labels
  return np.stack(images), labels


def _as_hw(crop):
  ch, cw = (crop, crop) if isinstance(crop, int) else tuple(crop)
  return int(ch), int(cw)


def random_crops(rng, images, labels, crop):
  """Takes one random crop of size `crop` (int or (h, w)) from each image.

  Args:
    rng: np.random.Generator or int seed.
    images: f32[N, H, W, 3]; labels: int[N, H, W].
  Returns:
    f32[N, h, w, 3] and int[N, h, w] (dtypes kept).
  """
  rng = np.random.default_rng(rng)
  n, height, width = labels.shape
  ch, cw = _as_hw(crop)
  if images.shape[:3] != labels.shape:
    raise ValueError(f"images {images.shape} and labels {labels.shape} differ in N, H, W.")
  if not (0 < ch <= height and 0 < cw <= width):
    raise ValueError(f"crop {(ch, cw)} must be positive and fit in images of {(height, width)}.")
  y0 = rng.integers(0, height - ch + 1, size=n)
  x0 = rng.integers(0, width - cw + 1, size=n)
  rows = (y0[:, None] + np.arange(ch))[:, :, None]
  cols = (x0[:, None] + np.arange(cw))[:, None, :]
  batch = np.arange(n)[:, None, None]
  return images[batch, rows, cols], labels[batch, rows, cols]


class SegmentationBatches:
  """Infinite, resumable iterator of shuffled (optionally cropped) batches.

  Global batch `step` takes indices `perm_epoch[i * B:(i + 1) * B]` (drop remainder), where
  the permutation depends only on (seed, epoch); crops depend on (seed, step). So the batches
  are the same for any process count, and process p gets rows
  [p * B / P, (p + 1) * B / P) of the global batch.

  `next()` returns dict(image=f32[B/P, h, w, 3], label=i32[B/P, h, w]).
  """

  def __init__(
    self,
    images,
    labels,
    *,
    batch_size,
    seed=0,
    crop=None,
    shuffle=True,
    process_index=None,
    process_count=None,
  ):
    if process_index is None or process_count is None:
      import jax  # only to read the process layout

      process_index, process_count = jax.process_index(), jax.process_count()
    if images.shape[:3] != labels.shape:
      raise ValueError(f"images {images.shape} and labels {labels.shape} differ in N, H, W.")
    if batch_size % process_count:
      raise ValueError(
        f"batch_size {batch_size} must be divisible by process_count {process_count}."
      )
    if not 0 < batch_size <= labels.shape[0]:
      raise ValueError(f"batch_size {batch_size} must be in [1, {labels.shape[0]}] (N).")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    self.images, self.labels = images, labels
    self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), shuffle
    self.crop = None if crop is None else _as_hw(crop)
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = labels.shape[0] // batch_size
    self.step = 0
    self._perm_epoch, self._perm = -1, None

  def __iter__(self):
    return self

  def __next__(self):
    epoch, i = divmod(self.step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      n = self.labels.shape[0]
      rng = np.random.default_rng([self.seed, epoch])
      self._perm = rng.permutation(n) if self.shuffle else np.arange(n)
      self._perm_epoch = epoch
    idx = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
    images, labels = self.images[idx], self.labels[idx]
    if self.crop is not None:
      # Crop the global batch, then shard, so a crop does not depend on the process count.
      rng = np.random.default_rng([self.seed, 1, self.step])
      images, labels = random_crops(rng, images, labels, self.crop)
    per = self.batch_size // self.process_count
    lo = self.process_index * per
    self.step += 1
    return {
      "image": np.asarray(images[lo : lo + per], np.float32),
      "label": np.asarray(labels[lo : lo + per], np.int32),
    }

  def get_state(self):
    """JSON-serialisable position; restore with `set_state`."""
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size}

  def set_state(self, state):
    if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
      raise ValueError(
        f"state is for seed {state['seed']}, batch_size {state['batch_size']}; this "
        f"iterator has seed {self.seed}, batch_size {self.batch_size}."
      )
    self.step = int(state["step"])
