"""Images in and out of a segmentation model: RGB reading, label PNGs, colour overlays, grids.

Label maps are written as palette PNGs (mode P): the pixel values are the class ids, so
`np.asarray(PIL.Image.open(path))` gives them back (and `segmentation.load_folder` reads them
as labels), while any viewer shows the PASCAL VOC colours. PIL ships with matplotlib; it is
imported inside the functions so that importing maskax stays cheap.
"""

from __future__ import annotations

import os

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg")


def read_rgb(path: str, *, min_side: int = 1) -> np.ndarray:
  """An RGB (or palette) PNG/JPEG as f32[H, W, 3] in [0, 1].

  Raises ValueError naming the file for any other channel layout (greyscale, alpha, CMYK:
  converting them would guess what the user meant) or when H or W is below `min_side`.
  """
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as im:
      if im.mode not in ("RGB", "P"):
        raise ValueError(
          f"{path}: {len(im.getbands())} channel(s) (mode {im.mode}); expected an "
          "RGB image [H, W, 3] (convert it, e.g. PIL's .convert('RGB'))."
        )
      image = np.asarray(im.convert("RGB"), np.float32) / 255.0
  except UnidentifiedImageError:
    raise ValueError(f"{path}: not a readable PNG or JPEG image.") from None
  if min(image.shape[:2]) < min_side:
    raise ValueError(
      f"{path}: {image.shape[0]}x{image.shape[1]} pixels; expected at least "
      f"{min_side}x{min_side} [H, W, 3]."
    )
  return image


def palette(num_classes: int) -> np.ndarray:
  """u8[C, 3]: the PASCAL VOC colour map (class 0 black), the convention of label PNGs."""
  colours = np.zeros((num_classes, 3), np.uint8)
  for c in range(num_classes):
    code = c
    for shift in range(7, -1, -1):  # the bits of the id, spread over R, G, B from the top bit
      for channel in range(3):
        colours[c, channel] |= ((code >> channel) & 1) << shift
      code >>= 3
  return colours


def write_labels_png(path: str, labels: np.ndarray, colours: np.ndarray) -> str:
  """Writes class ids int[H, W] (< 256) as a palette PNG with `colours` u8[C, 3]."""
  from PIL import Image

  im = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
  im.putpalette(np.asarray(colours, np.uint8).reshape(-1).tolist())
  return _save(im, path)


def overlay(
  image: np.ndarray, labels: np.ndarray, colours: np.ndarray, *, alpha: float = 0.5
) -> np.ndarray:
  """u8[H, W, 3]: `image` f32[H, W, 3] in [0, 1] blended with the colour of each pixel's class
  (labels int[H, W]); class 0 (background) keeps the image as it is."""
  tint = np.asarray(colours, np.float32)[labels] / 255.0
  blend = np.where((labels > 0)[..., None], (1.0 - alpha) * image + alpha * tint, image)
  return np.round(np.clip(blend, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_rgb_png(path: str, pixels: np.ndarray) -> str:
  """Writes u8[H, W, 3] as an RGB PNG."""
  from PIL import Image

  return _save(Image.fromarray(np.asarray(pixels, np.uint8), mode="RGB"), path)


def write_segmentation(base: str, image: np.ndarray, labels: np.ndarray, colours) -> dict:
  """Writes `<base>_labels.png` (class ids, `write_labels_png`) and `<base>_overlay.png` (the
  classes tinted over `image` f32[H, W, 3]) for labels int[H, W]; returns {"labels", "overlay",
  "class_pixels": pixels of each of the C classes of `colours` u8[C, 3]}."""
  return {
    "labels": write_labels_png(f"{base}_labels.png", labels, colours),
    "overlay": write_rgb_png(f"{base}_overlay.png", overlay(image, labels, colours)),
    "class_pixels": np.bincount(np.ravel(labels), minlength=len(colours)).tolist(),
  }


def write_prediction_grid(
  path: str, images, labels, preds, num_classes: int, *, ignore_label: int = 255, title: str = ""
) -> str:
  """A PNG grid, one row per image: input / ground truth / prediction (ignored pixels white).

  images: f32[N, H, W, 3] in [0, 1]; labels, preds: int[N, H, W].
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  from maskax.training import paths

  colours = [(0.1, 0.1, 0.1)] + [plt.get_cmap("tab10")(i)[:3] for i in range(num_classes - 1)]
  cmap = ListedColormap(colours + [(1.0, 1.0, 1.0)])
  to_index = lambda x: np.where(x == ignore_label, num_classes, x)
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
  for i in range(n):
    panels = (images[i], to_index(labels[i]), to_index(preds[i]))
    for j, (ax, panel, name) in enumerate(
      zip(axes[i], panels, ("input", "ground truth", "prediction"))
    ):
      if j == 0:
        ax.imshow(np.clip(panel, 0, 1), interpolation="nearest")
      else:
        ax.imshow(panel, cmap=cmap, vmin=0, vmax=num_classes, interpolation="nearest")
      ax.set_axis_off()
      if i == 0:
        ax.set_title(name, fontsize=9)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  with paths.as_path(path).open("wb") as f:  # a file object: `path` may be in a URL workdir
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return path


def _save(im, path: str) -> str:
  tmp = f"{path}.tmp{os.getpid()}.png"  # atomic: a reader never opens half an image
  im.save(tmp)
  os.replace(tmp, path)
  return path
