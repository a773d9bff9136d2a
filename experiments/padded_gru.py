"""Keras `Masking()` in plain JAX: which masks keep a padded GRU padding-invariant (BN, conv, ReLU)?

A conv -> batch norm -> ReLU -> GRU classifier (head on the final carry) is trained on
variable-length signals (lengths 5-200, zero-padded to the batch's length bucket) whose class
needs the whole valid sequence (the sign of a weak drift in channel 0) and its last valid step
(the sign of channel 1 there): `maskax.data.synthetic.drift_recall_sequences`. The per-step
loss targets the class of the prefix; padded steps repeat the sequence's class. One key,
`ablation.variant`, switches each masking point on or off:
  unmasked           padding fed as data everywhere; loss over all steps (padding included)
  masked_state_only  frozen carry past the length; loss over all steps
  masked_loss_only   loss over valid steps only; the GRU runs through the padding
  fully_masked       both, plus MaskedConv1D and MaskedBatchNorm (the Keras `Masking()` twin)
  plain_bn / plain_conv / plain_layers   fully_masked with nn.BatchNorm / nn.Conv / both
Held-out sequences are sorted by length, padded to their bucket (pad1x) and to 2x and 4x that
length; reported: accuracy at each (eval/acc_pad{1,2,4}x), the largest change of a predicted
class probability against pad1x (eval/drift_pad{2,4}x; also in training mode, i.e. with batch
statistics: eval/train_drift_pad4x), and the accuracy when the mask comes from the data by the
Keras rule instead of the lengths (eval/acc_keras_mask: real all-zero steps get masked).

  python launch.py --config=experiments/padded_gru.py --workdir=runs/padded_gru
  python launch.py --config=experiments/padded_gru.py --workdir=runs/padded_gru_ablation \
      --sweep=ablation.variant=unmasked,masked_state_only,masked_loss_only,fully_masked,plain_bn,plain_conv
  echo seqs.npz | python launch.py --config=experiments/padded_gru.py --workdir=runs/padded_gru \
      --predict=-          # classify x[B, T, F] + lengths[B] (or a .csv): predictions/seqs_pred.npz
Hardware: CPU. Default (batch 32, 500 steps): about 25 s of CPU time, 1.5 min wall per variant
on a shared 2-core CPU (4 training shapes and 12 eval shapes to compile); the 6-variant sweep
8.5 min. Expected (measured, 512 held-out sequences, Bayes-optimal accuracy 0.936):
fully_masked 0.930 at pad1x, 2x and 4x with drift exactly 0 (0.871 with the Keras mask);
unmasked 0.627 -> 0.529 at 4x; masked_loss_only 0.418 -> 0.230 (chance is 0.25).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.data import iterators, synthetic, user_files
from maskax.data.iterators import bucket_boundaries, bucket_for
from maskax.masking import losses, masks
from maskax.models import padded_gru
from maskax.models.padded_gru import Masking, PaddedGRUClassifier, apply
from maskax.training import evaluation, restore, train

PRESETS = {
  "default": "conv(2)-BN-ReLU-GRU(32), lengths 5-200, batch 32, 500 steps (~1.5 min on CPU)",
  "smoke": "tiny model, lengths 5-24, 4 steps, checkpoint every 2 (seconds; for tests)",
}
REPORT_METRICS = (
  "eval/acc_pad1x",
  "eval/acc_pad2x",
  "eval/acc_pad4x",
  "eval/drift_pad2x",
  "eval/drift_pad4x",
  "eval/train_drift_pad4x",
  "eval/acc_keras_mask",
  "eval/keras_drift",
)
CLASSES = 4


VARIANTS = {
  "unmasked": Masking(state=False, loss=False, batch_norm=False, conv=False),
  "masked_state_only": Masking(state=True, loss=False, batch_norm=True, conv=True),
  "masked_loss_only": Masking(state=False, loss=True, batch_norm=True, conv=True),
  "fully_masked": Masking(state=True, loss=True, batch_norm=True, conv=True),
  "plain_bn": Masking(state=True, loss=True, batch_norm=False, conv=True),
  "plain_conv": Masking(state=True, loss=True, batch_norm=True, conv=False),
  "plain_layers": Masking(state=True, loss=True, batch_norm=False, conv=False),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = common.preset(arg, PRESETS)
  c = ml_collections.ConfigDict()
  c.seed = 0  # init and training batches
  c.data = ml_collections.ConfigDict()
  c.data.seed = 0  # the held-out set (from data.seed + 1): the same for every training seed
  c.data.features = 4  # F: drift channel, recall channel, distractors
  c.data.min_length = 5
  c.data.max_length = 200
  c.data.num_buckets = 4  # a batch is padded to the smallest bucket holding its longest row
  c.data.drift = 0.2  # mean of channel 0 is +-drift: weak evidence, summed over the sequence
  c.data.blackout_prob = 0.3  # share of sequences with 1..blackout_max real all-zero steps
  c.data.blackout_max = 3
  c.data.trailing_share = 0.5  # share of blackouts that end the sequence (a black last frame)
  c.data.eval_size = 512  # held-out sequences
  c.data.eval_batch_size = 64  # sorted by length, so pad1x is close to each sequence's length
  c.data.pad_factors = (1, 2, 4)  # held-out padding: T = factor x the batch's bucket length
  c.model = ml_collections.ConfigDict()
  c.model.hidden = 32  # D, GRU width
  c.model.conv_layers = 2  # 0 = no conv front end; 2 lets a plain conv read its own padding
  c.model.conv_features = 16
  c.model.conv_kernel = 5  # 'SAME' padding: centred, so the last valid steps read padding
  c.model.bn_momentum = 0.9
  c.model.output_policy = "zero"  # GRU outputs at masked steps: zero | carry_forward
  c.ablation = ml_collections.ConfigDict()
  c.ablation.variant = "fully_masked"  # a key of VARIANTS (module docstring)
  c.train = common.train_config()  # + the loop's shared defaults (experiments/common.py)
  c.train.steps = 500
  c.train.batch_size = 32  # global batch
  c.train.learning_rate = 3e-3  # Adam
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.checkpoint_every = 250
  if arg == "smoke":
    c.data.max_length = 24
    c.data.num_buckets = 1  # one compiled shape per padding factor
    c.data.eval_size = 16
    c.data.eval_batch_size = 8
    c.model.hidden = 8
    c.model.conv_features = 4
    common.smoke_loop(c.train)
  return c


def make_model(config) -> PaddedGRUClassifier:
  if config.ablation.variant not in VARIANTS:
    raise ValueError(
      f"ablation.variant={config.ablation.variant!r}: use one of {', '.join(VARIANTS)}."
    )
  m = config.model
  return PaddedGRUClassifier(
    VARIANTS[config.ablation.variant],
    classes=CLASSES,
    hidden=m.hidden,
    conv_layers=m.conv_layers,
    conv_features=m.conv_features,
    conv_kernel=m.conv_kernel,
    bn_momentum=m.bn_momentum,
    output_policy=m.output_policy,
  )


def make_loss(model):
  """The Task loss: per-step cross-entropy (valid steps or all steps) and final-carry accuracy."""

  def loss(params, model_state, batch, key, *, train):
    del key
    x, labels, lengths = batch["x"], batch["labels"], batch["lengths"]
    valid = masks.sequence_mask(lengths, x.shape[1])  # bool[B, T]
    step_logits, final_logits, new_state = apply(model, params, model_state, x, valid, train=train)
    counted = valid if model.masking.loss else jnp.ones_like(valid)
    final_labels = jnp.take_along_axis(labels, (lengths - 1)[:, None], axis=1)[:, 0]
    everyone = jnp.ones(final_labels.shape, jnp.bool_)
    terms = {"xent": losses.masked_xent(step_logits, labels, counted, mode="token_mean")}
    metrics = {"acc": losses.masked_accuracy(final_logits, final_labels, everyone)}
    return terms, metrics, new_state

  return loss


def make_data(config):
  """(make_batch(rng, n) for SyntheticBatches, held-out batches, held-out facts, boundaries).

  Held-out sequences are sorted by length and each batch is padded to its bucket (pad1x);
  `make_eval_sums` pads further on the device. The facts do not depend on the padding: the
  share of rows that Keras' rule cuts short and the Bayes-optimal accuracy (sign of the
  channel-0 sum; the recall bit is exact).
  """
  d = config.data
  boundaries = bucket_boundaries(d.max_length, d.num_buckets, multiple_of=8)
  kw = dict(
    max_length=d.max_length,
    min_length=d.min_length,
    features=d.features,
    drift=d.drift,
    blackout_prob=d.blackout_prob,
    blackout_max=d.blackout_max,
    trailing_share=d.trailing_share,
  )

  def make_batch(rng, n):
    seqs = synthetic.drift_recall_sequences(rng, n, **kw)
    return synthetic.pad_sequences(seqs, bucket_for(int(seqs["lengths"].max()), boundaries))

  held_out = synthetic.drift_recall_sequences(
    np.random.default_rng([d.seed + 1, 0]), d.eval_size, **kw
  )
  x, lengths = held_out["x"], held_out["lengths"]
  order = np.argsort(lengths, kind="stable")
  rows = {k: held_out[k][order] for k in ("x", "labels", "lengths")}
  batches = evaluation.fixed_batches(rows, d.eval_batch_size)
  for i, batch in enumerate(batches):
    members = rows["lengths"][i * d.eval_batch_size : (i + 1) * d.eval_batch_size]
    batch.update(synthetic.pad_sequences(batch, bucket_for(int(members.max()), boundaries)))
  valid = np.arange(x.shape[1])[None] < lengths[:, None]
  facts = {
    "keras_mask_rows": float(np.any(np.all(x == 0, axis=-1) & valid, axis=-1).mean()),
    "bayes_acc": float(np.mean((x[:, :, 0].sum(1) > 0) == (held_out["sign"] > 0))),
  }
  return make_batch, batches, facts, boundaries


def make_eval_sums(model, pad_factors):
  """Held-out sums: accuracy at each padding factor (zeros up to factor x the batch's bucket),
  the largest change of a predicted class probability against the first factor (also with
  batch statistics, `train_drift`), and accuracy and drift with the Keras value mask."""
  first, last = pad_factors[0], pad_factors[-1]
  runs = [(f, False, None) for f in pad_factors] + [
    (first, True, None),
    (last, True, None),
    (1, False, "keras"),
  ]

  def eval_sums(params, model_state, batch, key):
    del key
    x1, lengths, valid = batch["x"], batch["lengths"], batch["valid"]
    final = jnp.take_along_axis(batch["labels"], (lengths - 1)[:, None], axis=1)[:, 0]

    def logits(factor, train, mask):
      x = jnp.pad(x1, ((0, 0), (0, (factor - 1) * x1.shape[1]), (0, 0)))
      mask = masks.mask_from_value(x1) if mask else masks.sequence_mask(lengths, x.shape[1])
      return apply(model, params, model_state, x, mask, train=train)[1]

    # One compiled softmax for every run (a loop body): fused into each consumer instead, XLA
    # may round equal logits differently, a spurious 1e-8 of drift (measured on `smoke`).
    probs = jax.lax.map(jax.nn.softmax, jnp.stack([logits(*r) for r in runs]))
    p = dict(zip(runs, probs))
    p1 = p[(first, False, None)]
    # Filler rows of a last batch (valid False) repeat a real row: they leave a Max unchanged.
    acc = lambda q: (
      jnp.sum((q.argmax(-1) == final) & valid, dtype=jnp.float32),
      jnp.sum(valid, dtype=jnp.float32),
    )
    drift = lambda q, r: evaluation.Max(jnp.max(jnp.abs(q - r)))
    sums = {f"acc_pad{f}x": acc(p[(f, False, None)]) for f in pad_factors}
    sums.update({f"drift_pad{f}x": drift(p[(f, False, None)], p1) for f in pad_factors[1:]})
    sums[f"train_drift_pad{last}x"] = drift(p[(last, True, None)], p[(first, True, None)])
    keras = p[(1, False, "keras")]  # Keras Masking(0.): the mask inferred from the values
    sums.update(acc_keras_mask=acc(keras), keras_drift=drift(keras, p1))
    return sums

  return eval_sums


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  model = make_model(config)
  make_batch, eval_batches, facts, boundaries = make_data(config)
  train_data = iterators.SyntheticBatches(
    make_batch, config.train.batch_size, config.seed, **common.this_process()
  )

  def init(key):
    x = jnp.zeros((2, boundaries[0], config.data.features), jnp.float32)
    variables = model.init(key, x, jnp.ones(x.shape[:2], jnp.bool_), train=False)
    return variables["params"], {"batch_stats": variables["batch_stats"]}

  task = train.Task(
    init=init,
    loss=make_loss(model),
    optimizer=optax.adam(config.train.learning_rate),
    train_data=train_data,
    eval_data=lambda: eval_batches,
    eval_sums=make_eval_sums(model, tuple(config.data.pad_factors)),
    eval_finish=lambda sums: facts,
  )
  _, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  return final


def predict(config, workdir: str, lines: list[str], *, out_dir: str = "predictions") -> list[dict]:
  """Classifies padded sequences: each line a .npz (x f32[B, T, F], lengths i32[B]) or .csv
  file (layouts: `maskax.data.user_files`; F = data.features) or a folder of them.

  Writes <out_dir>/<name>_pred.npz with probs f32[B, C] (class probabilities from the carry at
  each row's last valid step) and classes i32[B]; one {"input", "output", "rows", "steps",
  "class_counts": [C counts]} per file.
  """
  trained = restore.restore_params(workdir)
  classify = padded_gru.make_classifier(make_model(config))
  paths = user_files.expand_paths(lines, user_files.SEQUENCE_EXTENSIONS, what="sequence")
  stems = user_files.output_stems(paths)
  files = [user_files.read_sequences(p, features=config.data.features) for p in paths]

  os.makedirs(out_dir, exist_ok=True)
  out = []
  for path, stem, seqs in zip(paths, stems, files):
    probs = classify(trained.params, trained.model_state, seqs["x"], seqs["lengths"])
    classes = probs.argmax(-1).astype(np.int32)
    output = user_files.write_npz(
      os.path.join(out_dir, f"{stem}_pred.npz"), probs=probs, classes=classes
    )
    out.append(
      {
        "input": path,
        "output": output,
        "rows": len(classes),
        "steps": seqs["x"].shape[1],
        "class_counts": np.bincount(classes, minlength=CLASSES).tolist(),
      }
    )
  return out
