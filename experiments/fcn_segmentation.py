"""Patchwise vs fully convolutional training: does sampling the loss or balancing classes help?

Reproduces the comparison of Long, Shelhamer & Darrell, "Fully Convolutional Networks for
Semantic Segmentation" (CVPR 2015): §3.4 ("patchwise training is loss sampling"), §4.3 and
Figure 5. One key, `train.mode`, picks how the per-pixel loss is formed:
  full              whole images, loss over every valid pixel (label != 255).
  loss_sampling     keep each valid output cell's loss with probability loss.keep_prob
                    (`loss_sampling_p0.25` is shorthand for keep_prob 0.25); with
                    train.raise_batch the batch grows by 1/p, as in the paper.
  patchwise         random data.crop_size crops (batch grows by H*W / crop**2 with raise_batch).
  class_weighted    per-pixel weights from class frequencies (loss.class_weighting).
  class_sampled     background cells kept with probability loss.background_keep_prob.
The normalisation is named by loss.normalization (token_mean over kept pixels by default;
batch_mean is Caffe's per-image sum). Evaluation is always the plain model at full resolution
on a held-out set: pixel acc., mean acc., mean IoU, frequency-weighted IoU (§4).

  python launch.py --config=experiments/fcn_segmentation.py --workdir=runs/fcn
  python launch.py --config=experiments/fcn_segmentation.py --workdir=runs/fcn_ablation \
      --sweep=train.mode=full,loss_sampling_p0.5,loss_sampling_p0.25,patchwise,class_weighted
  echo my_images/ | python launch.py --config=experiments/fcn_segmentation.py --workdir=runs/fcn \
      --predict=- --predict_out=segmented    # label and overlay PNGs of each image
Hardware: CPU. Default (64x64, 6 classes, batch 16, 400 steps, `full`): 187 s of training
(about 4 min with data and startup) on a shared 2-core CPU; the five-mode ablation took 39 min
there (load average 7-15). Expected: held-out mean IoU 0.68 (pixel acc. 0.956) for `full`,
against 0.124 (0.742) for predicting background everywhere; loss_sampling_p0.25 reached 0.77.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.masking import losses, metrics, sampling
from maskax.training import evaluation, progress, restore, sharding, train
from maskax.data import images, segmentation, user_files
from maskax.models.fcn import FCN, FCNConfig

PRESETS = {
  "default": "FCN-8s, synthetic 64x64 shapes, batch 16, 400 steps (4 min for full on CPU)",
  "smoke": "tiny FCN on 16x16 images, 4 steps, checkpoint every 2 (seconds; for tests)",
}
MODES = ("full", "loss_sampling", "patchwise", "class_weighted", "class_sampled")
REPORT_METRICS = (
  "eval/mean_iou",
  "eval/pixel_acc",
  "eval/mean_acc",
  "eval/fw_iou",
  "eval/xent",
  "train_batch",
  "images_per_s",
  "wall_s",
)
RESUME_SAFE_KEYS = ("viz",)
IGNORE = segmentation.IGNORE_LABEL


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; presets: {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, batch order, crops and loss-sampling keys
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # folder with images/*.png and labels/*.png; "" = the synthetic set
  c.data.num_classes = 6  # C, background included (synthetic: 2..8; folder: its label count)
  c.data.height = 64  # synthetic image size (a folder keeps its own size)
  c.data.width = 64
  c.data.train_size = 2048  # synthetic training images
  c.data.eval_size = 256  # synthetic held-out images (another generator seed)
  c.data.eval_fraction = 0.1  # folder: share of images held out (a seeded split)
  c.data.seed = 0  # synthetic generator seed (the data stay fixed when c.seed changes)
  c.data.crop_size = 32  # patchwise: side of the random square crops
  c.data.eval_batch_size = 32  # held-out images per eval batch (multiple of the device count)
  c.model = ml_collections.ConfigDict()
  c.model.widths = (16, 32, 64, 64, 128)  # channels per VGG-like stage (stride 2**len)
  c.model.skips = 8  # finest fused stride: 32 = FCN-32s, 16 = FCN-16s, 8 = FCN-8s (§4.2)
  c.model.convs_per_stage = 2
  c.model.norm = True  # GroupNorm: training from scratch without VGG weights
  c.model.dropout_rate = 0.0
  c.loss = ml_collections.ConfigDict()
  c.loss.normalization = "token_mean"  # token_mean | batch_mean | sequence_mean | full_mean
  c.loss.keep_prob = 1.0  # loss_sampling: Bernoulli keep probability of each valid cell
  c.loss.sample_cell = 1  # loss_sampling: side in pixels of a cell kept or dropped together
  c.loss.class_weighting = "median"  # class_weighted: median | inverse frequency weights
  c.loss.background_keep_prob = 0.25  # class_sampled: keep prob. of background cells
  c.train = common.train_config()  # + the loop's shared defaults (experiments/common.py)
  c.train.mode = "full"  # full | loss_sampling[_pP] | patchwise | class_weighted | class_sampled
  c.train.raise_batch = True  # sampling modes: batch x 1/p (patchwise: x H*W/crop**2), §4.3
  c.train.steps = 400
  c.train.batch_size = 16  # global images per step before raise_batch
  c.train.learning_rate = 3e-3  # Adam
  c.train.log_every = 25
  c.train.eval_every = 50
  c.train.checkpoint_every = 200
  c.viz = ml_collections.ConfigDict()
  c.viz.num_images = 6  # held-out images in predictions.png (0: no grid)
  if arg == "smoke":
    c.data.height = c.data.width = 16
    c.data.train_size, c.data.eval_size = 32, 8
    c.data.crop_size = 8
    c.data.eval_batch_size = 4
    c.model.widths = (4, 8)
    c.model.skips = 2
    c.model.convs_per_stage = 1
    common.smoke_loop(c.train, batch_size=4)
    c.viz.num_images = 2
  return c


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How the training loss counts pixels (resolved from train.mode and config.loss).

  class_weights / class_keep_probs: C floats (class_weighted / class_sampled), else None.
  """

  mode: str
  normalization: str = "token_mean"
  keep_prob: float = 1.0
  sample_cell: int = 1
  class_weights: tuple[float, ...] | None = None
  class_keep_probs: tuple[float, ...] | None = None


def parse_mode(mode: str, keep_prob: float) -> tuple[str, float]:
  """`'loss_sampling_p0.25'` -> `('loss_sampling', 0.25)`; other modes pass keep_prob through."""
  match = re.fullmatch(r"loss_sampling_p([0-9.]+)", mode)
  if match:
    if keep_prob != 1.0:
      raise ValueError(
        f"train.mode={mode!r} sets the keep probability; leave loss.keep_prob at "
        f"1.0 (got {keep_prob}) or use train.mode=loss_sampling."
      )
    mode, keep_prob = "loss_sampling", float(match.group(1))
  if mode not in MODES:
    raise ValueError(
      f"train.mode={mode!r}: use one of {', '.join(MODES)} "
      "(or loss_sampling_pP, e.g. loss_sampling_p0.5)."
    )
  if not 0.0 < keep_prob <= 1.0:
    raise ValueError(f"keep probability must be in (0, 1], got {keep_prob}.")
  if mode != "loss_sampling" and keep_prob != 1.0:
    raise ValueError(
      f"loss.keep_prob={keep_prob} only applies with train.mode=loss_sampling; "
      f"got train.mode={mode!r}."
    )
  return mode, keep_prob


def resolve(config, train_labels) -> tuple[LossSpec, int, int | None]:
  """The loss spec, the global training batch and the crop side (None: whole images).

  train_labels: u8[N, H, W], for class frequencies (class_weighted, class_sampled).
  """
  mode, p = parse_mode(config.train.mode, config.loss.keep_prob)
  num_classes = config.data.num_classes
  if config.loss.normalization not in losses.MODES:
    raise ValueError(
      f"loss.normalization={config.loss.normalization!r}: use one of {losses.MODES}."
    )
  if config.loss.sample_cell < 1:
    raise ValueError(f"loss.sample_cell={config.loss.sample_cell} must be >= 1 (1 = per pixel).")
  if config.loss.class_weighting not in ("median", "inverse"):
    raise ValueError(
      f"loss.class_weighting={config.loss.class_weighting!r}: use median or inverse."
    )
  if not 0.0 < config.loss.background_keep_prob <= 1.0:
    raise ValueError(
      f"loss.background_keep_prob={config.loss.background_keep_prob} must be in (0, 1]."
    )
  spec = LossSpec(
    mode=mode,
    normalization=config.loss.normalization,
    keep_prob=p,
    sample_cell=config.loss.sample_cell,
  )
  height, width = train_labels.shape[1:]
  batch, crop, factor = config.train.batch_size, None, 1.0
  if mode == "loss_sampling":
    factor = 1.0 / p
  elif mode == "patchwise":
    crop = config.data.crop_size
    if not 0 < crop <= min(height, width):
      raise ValueError(f"data.crop_size={crop} must be in [1, {min(height, width)}] (image size).")
    factor = height * width / crop**2
  elif mode == "class_weighted":
    counts = segmentation.class_frequencies(train_labels, num_classes, normalize=False)
    present = None
    if config.loss.class_weighting == "median":  # Eigen & Fergus (2015): freq per image holding c
      has = np.stack([(train_labels == c).any(axis=(1, 2)) for c in range(num_classes)])
      per_image = (train_labels != IGNORE).sum(axis=(1, 2))
      present = (has * per_image[None]).sum(axis=1)
    w = losses.class_weights_from_counts(
      counts, method=config.loss.class_weighting, present_pixels=present
    )
    spec = dataclasses.replace(spec, class_weights=tuple(float(x) for x in np.asarray(w)))
  elif mode == "class_sampled":
    probs = (config.loss.background_keep_prob,) + (1.0,) * (num_classes - 1)
    spec = dataclasses.replace(spec, class_keep_probs=probs)
  if config.train.raise_batch and factor != 1.0:
    # Round up to whole rows per device, so the batch still shards evenly.
    n = jax.device_count()
    batch = int(math.ceil(batch * factor / n - 1e-9)) * n
  if batch > train_labels.shape[0]:
    raise ValueError(
      f"the training batch ({batch}) exceeds the training set "
      f"({train_labels.shape[0]} images); raise data.train_size."
    )
  return spec, batch, crop


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


def build_model(config) -> FCN:
  m = config.model
  return FCN(
    FCNConfig(
      num_classes=config.data.num_classes,
      widths=tuple(m.widths),
      skips=m.skips,
      convs_per_stage=m.convs_per_stage,
      norm=m.norm,
      dropout_rate=m.dropout_rate,
    )
  )


def make_loss(model: FCN, spec: LossSpec):
  """The Task loss: `(params, model_state, batch, key, *, train) -> (terms, metrics, state)`."""

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


def load_data(config):
  """(train_images, train_labels, eval_images, eval_labels): f32[N, H, W, 3] and u8[N, H, W]."""
  d = config.data
  if d.path:
    images, labels = segmentation.load_folder(d.path, num_classes=d.num_classes)
    order = np.random.default_rng(d.seed).permutation(len(labels))
    n_eval = max(1, int(round(d.eval_fraction * len(labels))))
    if n_eval >= len(labels):
      raise ValueError(
        f"data.eval_fraction={d.eval_fraction} leaves no training images "
        f"in {d.path!r} ({len(labels)} images)."
      )
    tr, ev = order[n_eval:], order[:n_eval]
    return images[tr], labels[tr], images[ev], labels[ev]
  kw = dict(height=d.height, width=d.width, num_classes=d.num_classes)
  train_images, train_labels = segmentation.make_dataset(d.train_size, seed=d.seed, **kw)
  eval_images, eval_labels = segmentation.make_dataset(d.eval_size, seed=d.seed + 1, **kw)
  return train_images, train_labels, eval_images, eval_labels


def write_prediction_grid(path, images, labels, preds, num_classes, title=""):
  """PNG grid, one row per image: input / ground truth / prediction (void = white).

  images: f32[N, H, W, 3]; labels, preds: int[N, H, W].
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  colours = [(0.1, 0.1, 0.1)] + [plt.get_cmap("tab10")(i)[:3] for i in range(num_classes - 1)]
  cmap = ListedColormap(colours + [(1.0, 1.0, 1.0)])
  to_index = lambda x: np.where(x == IGNORE, num_classes, x)
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
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _speed(workdir, batch) -> dict[str, float]:
  """images/s (median over log intervals: compile and resume intervals are outliers) and the
  run's wall time (training, compile, evaluation and checkpoints, summed over resumes)."""
  records = progress.read_metrics(workdir)
  rates = [r["steps_per_s"] for r in records if isinstance(r.get("steps_per_s"), float)]
  times = [r["time"] for r in records]
  return {
    "images_per_s": float(np.median(rates)) * batch if rates else float("nan"),
    "wall_s": max(times) if times else float("nan"),
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  train_images, train_labels, eval_images, eval_labels = load_data(config)
  spec, batch, crop = resolve(config, train_labels)
  model = build_model(config)
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_data = segmentation.SegmentationBatches(
    train_images, train_labels, batch_size=batch, seed=config.seed, crop=crop, **proc
  )
  eval_batches = evaluation.fixed_batches(
    {"image": eval_images, "label": eval_labels}, config.data.eval_batch_size
  )
  shape = (1, crop or train_images.shape[1], crop or train_images.shape[2], 3)

  def init(key):
    return model.init(key, jnp.zeros(shape, jnp.float32), train=False)["params"], {}

  task = train.Task(
    init=init,
    loss=make_loss(model, spec),
    optimizer=optax.adam(config.train.learning_rate),
    train_data=train_data,
    eval_data=lambda: eval_batches,
    eval_sums=make_eval_sums(model),
    eval_finish=eval_finish,
  )
  state, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  final = {**final, "train_batch": float(batch), **_speed(workdir, batch)}
  k = min(config.viz.num_images, len(eval_labels))
  if k and jax.process_index() == 0:
    apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x, train=False), -1))
    preds = np.asarray(apply(sharding.to_host(state.params), eval_images[:k]))
    write_prediction_grid(
      os.path.join(workdir, "predictions.png"),
      eval_images[:k],
      eval_labels[:k],
      preds,
      config.data.num_classes,
      title=f"{config.train.mode}: held-out mean IoU "
      f"{final.get('eval/mean_iou', float('nan')):.3f}",
    )
  return final


def predict(config, workdir: str, lines: list[str], *, out_dir: str = "predictions") -> list[dict]:
  """Segments images: each line a PNG/JPEG file or a folder of them.

  Any size of at least the net's total stride (2**len(model.widths)): the net is fully
  convolutional, so nothing is resized, but objects should have about the training scale. RGB
  only (greyscale or alpha is an error naming the file). Writes <out_dir>/<name>_labels.png (a
  palette PNG whose pixel values are the class ids) and <name>_overlay.png (the classes tinted
  over the image); one {"image", "labels", "overlay", "class_pixels": [C counts]} per image.
  """
  params = restore.restore_params(workdir).params
  model = build_model(config)
  paths = user_files.expand_paths(lines, images.EXTENSIONS, what="image")
  stems = user_files.output_stems(paths)
  # Every image is read and checked before the first output is written.
  pixels = [images.read_rgb(p, min_side=model.config.stride) for p in paths]
  segment = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x, train=False), -1))
  colours = images.palette(config.data.num_classes)
  os.makedirs(out_dir, exist_ok=True)
  out = []
  for path, stem, image in zip(paths, stems, pixels):
    labels = np.asarray(segment(params, image[None]))[0]  # i32[H, W]
    base = os.path.join(out_dir, stem)
    out.append(
      {
        "image": path,
        "labels": images.write_labels_png(f"{base}_labels.png", labels, colours),
        "overlay": images.write_rgb_png(
          f"{base}_overlay.png", images.overlay(image, labels, colours)
        ),
        "class_pixels": np.bincount(labels.ravel(), minlength=colours.shape[0]).tolist(),
      }
    )
  return out
