"""The BERT pretraining task (MLM + NSP) from plain arguments: model, init, loss, optimizer.

The losses are google-research/bert `run_pretraining.py`'s: mlm = token mean over the real
prediction slots of the whole global batch, nsp = batch mean, total = mlm + nsp. The MLM head
runs on the gathered masked positions only, unless a reduction needs every position.
`experiments/bert_pretrain.py` fills these from its config; `benchmarks/bert_step_bench.py`
times the same step. Letters: B batch, T seq_len, P max predictions, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
import optax

from maskax.masking import losses
from maskax.models import bert, hf_bert

# How the MLM loss is reduced (the experiment's ablation): the masked-token mean (BERT), the
# masked sum over non-pad tokens, or a loss on every (non-pad) position against its original id.
MLM_REDUCTIONS = ("masked", "masked_sum_over_nonpad", "all_nonpad_tokens", "all_tokens")


def make_model(
  size: str,
  vocab_size: int,
  *,
  seq_len: int,
  init_from: str = "",
  num_layers: int = 0,
  hidden: int = 0,
  num_heads: int = 0,
  intermediate: int = 0,
  max_position: int = 0,
  dropout: float = 0.1,
  dtype: str = "float32",
) -> bert.Bert:
  """A `bert.BertConfig.preset(size)` model; sizes > 0 override the preset's, `max_position` 0
  means max(seq_len, 512). With `init_from` (a HF BertForPreTraining folder) its sizes win and
  only dropout and dtype come from here."""
  if init_from:
    imported = hf_bert.read_config(init_from)
    if seq_len > imported.max_position:
      raise ValueError(
        f"data.seq_len={seq_len} exceeds the {imported.max_position} positions of "
        f"model.init_from={init_from}; lower data.seq_len."
      )
    return bert.Bert(
      dataclasses.replace(
        imported, dropout=dropout, attention_dropout=dropout, dtype=jnp.dtype(dtype)
      )
    )
  given = dict(num_layers=num_layers, hidden=hidden, num_heads=num_heads, intermediate=intermediate)
  return bert.Bert(
    bert.BertConfig.preset(
      size,
      vocab_size,
      max_position=max_position or max(seq_len, 512),
      dropout=dropout,
      attention_dropout=dropout,
      dtype=jnp.dtype(dtype),
      **{k: v for k, v in given.items() if v > 0},
    )
  )


def init_fn(model: bert.Bert, *, seq_len: int, max_predictions: int, init_from: str = ""):
  """key -> (params, {}): a fresh model, or the parameters of the `init_from` checkpoint."""
  if init_from:
    # Host arrays, closed over: the jitted init returns them as they are (for BERT-base that
    # embeds 0.4 GB of constants in one compile, paid once per run).
    params = hf_bert.load(init_from)[0]
    return lambda key: (params, {})

  def init(key):
    zeros = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(
      key,
      zeros,
      zeros,
      jnp.ones((1, seq_len), bool),
      jnp.zeros((1, max_predictions), jnp.int32),
      train=False,
    )
    return variables["params"], {}

  return init


def make_loss(
  model: bert.Bert, *, mask_id: int, mlm_reduction: str = "masked", mlm_head="gathered"
):
  """The task's loss: MLM (reduced by `mlm_reduction`, one of MLM_REDUCTIONS) + NSP, and the
  metrics: masked-token loss and accuracy (also per kind of slot: [MASK] / random / kept, by
  `losses.mlm_slot_accuracies`) and NSP accuracy. The all-position reductions use the full head."""
  mode = mlm_reduction
  if mode not in MLM_REDUCTIONS:
    raise ValueError(f"loss.mlm_reduction={mode!r}; choose one of {', '.join(MLM_REDUCTIONS)}.")
  head = "full" if mode.startswith("all_") else mlm_head

  def loss(params, model_state, batch, key, *, train):
    out = model.apply(
      {"params": params},
      batch["input_ids"],
      batch["segment_ids"],
      batch["input_mask"],
      batch["masked_lm_positions"],
      train=train,
      mlm_head=head,
      rngs={"dropout": key},
    )
    logits = out["mlm_logits"]
    gathered = (
      bert.gather_positions(logits, batch["masked_lm_positions"]) if head == "full" else logits
    )
    ids, weights = batch["masked_lm_ids"], batch["masked_lm_weights"]
    masked = losses.mlm_loss(gathered, ids, weights)
    if mode == "masked":
      mlm = masked
    elif mode == "masked_sum_over_nonpad":  # right numerator, wrong denominator
      mlm = (masked[0], jnp.sum(batch["input_mask"]).astype(jnp.float32))
    elif mode == "all_nonpad_tokens":  # every real token predicts its original id
      mlm = losses.masked_xent(logits, batch["original_ids"], batch["input_mask"])
    else:  # all_tokens: padding included (its label is [PAD] = 0)
      mlm = losses.masked_xent(logits, batch["original_ids"], jnp.ones_like(batch["input_mask"]))
    nsp_labels = batch["next_sentence_labels"]
    every = jnp.ones(nsp_labels.shape, jnp.bool_)
    terms = {"mlm": mlm, "nsp": losses.nsp_loss(out["nsp_logits"], nsp_labels)}
    metrics = {
      "mlm_masked_loss": masked,
      "mlm_accuracy": losses.mlm_accuracy(gathered, ids, weights),
      **losses.mlm_slot_accuracies(gathered, batch, mask_id),
      "nsp_accuracy": losses.masked_accuracy(out["nsp_logits"], nsp_labels, every),
    }
    return terms, metrics, model_state

  return loss


def make_optimizer(
  *,
  learning_rate: float,
  warmup_steps: int,
  steps: int,
  weight_decay: float = 0.01,
  grad_clip: float = 1.0,
) -> optax.GradientTransformation:
  """AdamW with linear warmup to `learning_rate`, linear decay to 0 at `steps`; gradients
  clipped to global norm `grad_clip`; no weight decay on LayerNorm parameters and biases
  (`bert.weight_decay_mask`), as google-research/bert."""
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, learning_rate, warmup_steps),
      optax.linear_schedule(learning_rate, 0.0, max(steps - warmup_steps, 1)),
    ],
    [warmup_steps],
  )
  return optax.chain(
    optax.clip_by_global_norm(grad_clip),
    optax.adamw(schedule, weight_decay=weight_decay, mask=bert.weight_decay_mask),
  )


def unigram_baseline(
  counts: np.ndarray, special_ids: Iterable[int], eval_batches: Iterable[dict]
) -> dict:
  """Accuracy and loss of predicting every masked token of `eval_batches` from training unigram
  frequencies `counts` (i64[V], e.g. `PreparedBatches.unigram_counts()`); special tokens never
  count as a guess."""
  counts = np.asarray(counts, np.float64).copy()
  counts[list(special_ids)] = 0
  probs = (counts + 1) / (counts + 1).sum()  # add-one, so unseen tokens have finite loss
  ids = np.concatenate([b["masked_lm_ids"][b["masked_lm_weights"] > 0] for b in eval_batches])
  return {
    "unigram_accuracy": float(np.mean(ids == np.argmax(counts))),
    "unigram_loss": float(-np.mean(np.log(probs[ids]))),
  }
