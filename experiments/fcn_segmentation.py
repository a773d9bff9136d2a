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

import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.data import images, segmentation, user_files
from maskax.masking import losses
from maskax.models import fcn
from maskax.training import evaluation, progress, restore, sharding, train

PRESETS = {
  "default": "FCN-8s, synthetic 64x64 shapes, batch 16, 400 steps (4 min for full on CPU)",
  "smoke": "tiny FCN on 16x16 images, 4 steps, checkpoint every 2 (seconds; for tests)",
}
MODES = fcn.LOSS_MODES  # full | loss_sampling | patchwise | class_weighted | class_sampled
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


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = common.preset(arg, PRESETS)
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


def resolve(config, train_labels) -> tuple[fcn.LossSpec, int, int | None]:
  """The loss spec, the global training batch and the crop side (None: whole images).

  train_labels: u8[N, H, W], for class frequencies (class_weighted, class_sampled).
  """
  mode, p = parse_mode(config.train.mode, config.loss.keep_prob)
  num_classes, c = config.data.num_classes, config.loss
  if c.normalization not in losses.MODES:
    raise ValueError(f"loss.normalization={c.normalization!r}: use one of {losses.MODES}.")
  if c.sample_cell < 1:
    raise ValueError(f"loss.sample_cell={c.sample_cell} must be >= 1 (1 = per pixel).")
  if c.class_weighting not in ("median", "inverse"):
    raise ValueError(f"loss.class_weighting={c.class_weighting!r}: use median or inverse.")
  if not 0.0 < c.background_keep_prob <= 1.0:
    raise ValueError(f"loss.background_keep_prob={c.background_keep_prob} must be in (0, 1].")
  spec = dict(mode=mode, normalization=c.normalization, keep_prob=p, sample_cell=c.sample_cell)
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
    method = c.class_weighting
    spec["class_weights"] = fcn.class_weights(train_labels, num_classes, method=method)
  elif mode == "class_sampled":
    spec["class_keep_probs"] = (c.background_keep_prob,) + (1.0,) * (num_classes - 1)
  if config.train.raise_batch and factor != 1.0:
    # Round up to whole rows per device, so the batch still shards evenly.
    n = jax.device_count()
    batch = int(math.ceil(batch * factor / n - 1e-9)) * n
  if batch > train_labels.shape[0]:
    raise ValueError(
      f"the training batch ({batch}) exceeds the training set "
      f"({train_labels.shape[0]} images); raise data.train_size."
    )
  return fcn.LossSpec(**spec), batch, crop


def make_model(config) -> fcn.FCN:
  m = config.model
  return fcn.FCN(
    fcn.FCNConfig(
      num_classes=config.data.num_classes,
      widths=tuple(m.widths),
      skips=m.skips,
      convs_per_stage=m.convs_per_stage,
      norm=m.norm,
      dropout_rate=m.dropout_rate,
    )
  )


def make_data(config):
  """(train_images, train_labels, eval_images, eval_labels): f32[N, H, W, 3] and u8[N, H, W]."""
  d = config.data
  if d.path:
    images, labels = segmentation.load_folder(d.path, num_classes=d.num_classes)
    tr, ev = user_files.split_held_out(len(labels), d.eval_fraction, seed=d.seed, what="images")
    return images[tr], labels[tr], images[ev], labels[ev]
  kw = dict(height=d.height, width=d.width, num_classes=d.num_classes)
  train_images, train_labels = segmentation.make_dataset(d.train_size, seed=d.seed, **kw)
  eval_images, eval_labels = segmentation.make_dataset(d.eval_size, seed=d.seed + 1, **kw)
  return train_images, train_labels, eval_images, eval_labels


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  train_images, train_labels, eval_images, eval_labels = make_data(config)
  spec, batch, crop = resolve(config, train_labels)
  model = make_model(config)
  train_data = segmentation.SegmentationBatches(
    train_images, train_labels, batch_size=batch, seed=config.seed, crop=crop
  )
  eval_batches = evaluation.fixed_batches(
    {"image": eval_images, "label": eval_labels}, config.data.eval_batch_size
  )
  shape = (1, crop or train_images.shape[1], crop or train_images.shape[2], 3)

  def init(key):
    return model.init(key, jnp.zeros(shape, jnp.float32), train=False)["params"], {}

  task = train.Task(
    init=init,
    loss=fcn.make_loss(model, spec),
    optimizer=optax.adam(config.train.learning_rate),
    train_data=train_data,
    eval_data=lambda: eval_batches,
    eval_sums=fcn.make_eval_sums(model),
    eval_finish=fcn.eval_finish,
  )
  state, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  # wall_s: the run's time with compilation, evaluation and checkpoints, summed over resumes.
  times = [r["time"] for r in progress.read_metrics(workdir)]
  final = {
    **final,
    "train_batch": float(batch),
    "images_per_s": common.per_second(final, batch),
    "wall_s": max(times, default=float("nan")),
  }
  k = min(config.viz.num_images, len(eval_labels))
  if k and jax.process_index() == 0:
    preds = fcn.make_segmenter(model)(sharding.to_host(state.params), eval_images[:k])
    images.write_prediction_grid(
      os.path.join(workdir, "predictions.png"),
      eval_images[:k],
      eval_labels[:k],
      np.asarray(preds),
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
  model = make_model(config)
  paths = user_files.expand_paths(lines, images.EXTENSIONS, what="image")
  stems = user_files.output_stems(paths)
  # Every image is read and checked before the first output is written.
  pixels = [images.read_rgb(p, min_side=model.config.stride) for p in paths]
  segment = fcn.make_segmenter(model)
  colours = images.palette(config.data.num_classes)
  os.makedirs(out_dir, exist_ok=True)
  out = []
  for path, stem, image in zip(paths, stems, pixels):
    labels = np.asarray(segment(params, image[None]))[0]  # i32[H, W]
    written = images.write_segmentation(os.path.join(out_dir, stem), image, labels, colours)
    out.append({"image": path, **written})
  return out
