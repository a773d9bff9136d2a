"""BERT pretraining (MLM + NSP): is the MLM mean over masked tokens, all tokens or non-pad tokens?

Pretrains a small BERT on the embedded corpus (English text that ships with Python) with the
losses of google-research/bert `run_pretraining.py`: mlm = token mean over the real prediction
slots of the whole global batch, nsp = batch mean, total = mlm + nsp. The MLM head runs on the
gathered masked positions only. The ablation trains the same model with four MLM reductions
(`loss.mlm_reduction`) and compares held-out *masked-token* accuracy:

  python launch.py --config=experiments/bert_pretrain.py       # the main job (tiny BERT)
  python launch.py --config=experiments/bert_pretrain.py:ablation \
      --sweep=loss.mlm_reduction=masked,masked_sum_over_nonpad,all_nonpad_tokens,all_tokens
  python launch.py --config=experiments/bert_pretrain.py:ablation --sweep=model.mlm_head=gathered,full

Hardware: a 2-core CPU runs the default in about 3 minutes (measured 2 min 47 s idle); `base` is
for accelerators (6.5 steps/s on one H200). Expected (measured, README): held-out masked-token
accuracy 0.11-0.12 against 0.057 for the unigram baseline. Accuracy is also reported per kind of slot
([MASK] / random / kept, `losses.mlm_slot_accuracies`): only [MASK] slots measure prediction from context.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.masking import losses
from maskax.training import restore, train
from maskax.data import corpus, tokenizer as tokenizer_lib
from maskax.data.batching import BertBatches
from maskax.models import bert, bert_predict, hf_bert

PRESETS = {
  "default": "tiny BERT (2x128), seq 128, 600 steps: about 3 minutes on a 2-core CPU",
  "ablation": "as default with 200 steps, for the 4-way MLM-reduction sweep",
  "mini": "4x256 BERT, 2,000 steps (a faster CPU or a GPU)",
  "base": "BERT-base 12x768, seq 128, batch 256, bf16 compute, WordPiece 10k (accelerators)",
  "smoke": "1-layer 32-wide BERT on a slice of the corpus, 4 steps (seconds; tests)",
}
# The learning-rate schedule decays to 0 at train.steps: extending a run would change it.
RESUME_PINNED_KEYS = ("train.steps",)
MLM_REDUCTIONS = ("masked", "masked_sum_over_nonpad", "all_nonpad_tokens", "all_tokens")
REPORT_METRICS = (
  "eval/mlm_accuracy",
  "eval/mlm_accuracy_mask_slots",
  "eval/mlm_masked_loss",
  "eval/nsp_accuracy",
  "steps_per_s",
  "tokens_per_s",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; presets: {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # model init, data order, masks and dropout all derive from it
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # '' = embedded corpus; else a text file (blank-line documents) or a folder
  c.data.vocab_file = ""  # '' = train WordPiece on the corpus (cached in the workdir)
  c.data.vocab_size = 8000  # WordPiece vocabulary when training one
  c.data.max_documents = 0  # >0: use only the first N documents (smoke tests)
  c.data.eval_fraction = 0.05  # held-out share of documents
  c.data.seed = 0  # picks the held-out documents and their masks; apart from `seed`, so that
  # runs with several training seeds score the same held-out set
  c.data.eval_batches = 8  # held-out batches per evaluation
  c.data.seq_len = 128  # max_seq_length
  c.data.max_predictions = 20  # max_predictions_per_seq (P)
  c.data.masked_lm_prob = 0.15
  c.data.masking = "static"  # static (google-research/bert) | dynamic (HF collator, per batch)
  c.data.whole_word_masking = False
  c.data.short_seq_prob = 0.1
  c.model = ml_collections.ConfigDict()
  c.model.size = "tiny"  # smoke | tiny | mini | base: shorthands for the five sizes below
  c.model.init_from = ""  # a HF BertForPreTraining folder (config.json or bert_config.json,
  # model.safetensors, vocab.txt) to continue pretraining from: its sizes and vocab.txt win
  c.model.num_layers = 0  # > 0 overrides the size's layer count (as each of the next four)
  c.model.hidden = 0  # D
  c.model.num_heads = 0
  c.model.intermediate = 0  # feed-forward width
  c.model.max_position = 0  # position table rows; 0: max(data.seq_len, 512)
  c.model.mlm_head = "gathered"  # gathered (P positions) | full (all T positions)
  c.model.dtype = "float32"  # float32 | bfloat16 (compute dtype; params stay f32)
  c.model.dropout = 0.1
  c.loss = ml_collections.ConfigDict()
  c.loss.mlm_reduction = "masked"  # one of MLM_REDUCTIONS (the ablation)
  c.train = common.train_config()  # + the loop's shared defaults (experiments/common.py)
  c.train.steps = 600
  c.train.batch_size = 32  # global
  c.train.learning_rate = 1e-3  # peak, after linear warmup; then linear decay to 0
  c.train.warmup_steps = 60
  c.train.weight_decay = 0.01  # AdamW, as BERT
  c.train.grad_clip = 1.0
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  if arg == "ablation":
    # 200 steps: the two all-position modes run the vocab projection on all B*T positions and
    # are ~4x slower per step on a CPU than the gathered head.
    c.train.steps = 200
    c.train.warmup_steps = 20
    c.train.eval_every = 50
  elif arg == "mini":
    c.model.size = "mini"
    c.train.steps = 2000
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 200
  elif arg == "base":
    c.model.size = "base"
    c.model.dtype = "bfloat16"
    # BERT's 30522 needs a larger corpus: WordPiece on the embedded one stops near 13k tokens.
    # With data.path set to your own corpus, pass --config.data.vocab_size=30522.
    c.data.vocab_size = 10000
    c.train.batch_size = 256
    c.train.steps = 10000
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 1000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
  elif arg == "smoke":
    c.model.size = "smoke"
    c.data.max_documents = 300
    c.data.vocab_size = 1000
    c.data.seq_len = 32
    c.data.max_predictions = 5
    c.data.eval_fraction = 0.2
    c.data.eval_batches = 1
    common.smoke_loop(c.train)
    c.train.warmup_steps = 1
  return c


def build_data(config, workdir):
  """Tokenizer, training iterator, fixed held-out batches."""
  docs = corpus.load_documents(config.data.path or None)
  if config.data.max_documents:
    docs = docs[: config.data.max_documents]
  train_docs, eval_docs = corpus.split_documents(docs, config.data.eval_fraction, config.data.seed)
  if not eval_docs:
    raise ValueError("data.eval_fraction leaves no held-out document; raise it or add data.")
  # An imported checkpoint brings its own vocabulary: its ids index the embedding table.
  vocab_file = config.data.vocab_file or (
    os.path.join(config.model.init_from, "vocab.txt") if config.model.init_from else ""
  )
  tok = tokenizer_lib.for_run(train_docs, config.data.vocab_size, workdir, vocab_file=vocab_file)
  common = dict(
    batch_size=config.train.batch_size,
    seq_len=config.data.seq_len,
    max_predictions=config.data.max_predictions,
    masked_lm_prob=config.data.masked_lm_prob,
    short_seq_prob=config.data.short_seq_prob,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  train_data = BertBatches(
    train_docs,
    tok,
    masking=config.data.masking,
    seed=config.seed,
    whole_word_masking=config.data.whole_word_masking,
    **common,
  )
  # Held-out masks are static and fixed, so every evaluation scores the same predictions.
  eval_iter = BertBatches(
    eval_docs,
    tok,
    masking="static",
    seed=config.data.seed + 1,
    dupe_factor=1,
    num_epochs=1,
    **common,
  )
  eval_batches = [b for _, b in zip(range(config.data.eval_batches), eval_iter)]
  if not eval_batches:
    raise ValueError("the held-out split is smaller than one batch; raise data.eval_fraction.")
  return tok, train_data, eval_batches


def unigram_baseline(train_data: BertBatches, eval_batches, vocab_size: int) -> dict:
  """Accuracy and loss of predicting every masked token from training unigram frequencies."""
  inst = train_data.instances
  counts = np.bincount(inst.tokens[inst.input_mask], minlength=vocab_size).astype(np.float64)
  counts[list(train_data.tokenizer.special_ids)] = 0
  probs = (counts + 1) / (counts + 1).sum()  # add-one, so unseen tokens have finite loss
  ids = np.concatenate([b["masked_lm_ids"][b["masked_lm_weights"] > 0] for b in eval_batches])
  return {
    "unigram_accuracy": float(np.mean(ids == np.argmax(counts))),
    "unigram_loss": float(-np.mean(np.log(probs[ids]))),
  }


def make_loss(model, config, mask_id: int):
  """The task's loss: MLM (reduced by `loss.mlm_reduction`) + NSP, and the metrics."""
  mode = config.loss.mlm_reduction
  if mode not in MLM_REDUCTIONS:
    raise ValueError(f"loss.mlm_reduction={mode!r}; choose one of {', '.join(MLM_REDUCTIONS)}.")
  head = "full" if mode.startswith("all_") else config.model.mlm_head

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


def make_model(config, vocab_size: int) -> bert.Bert:
  m = config.model
  if m.init_from:  # the imported checkpoint's sizes, with this run's dropout and dtype
    imported = hf_bert.read_config(m.init_from)
    if config.data.seq_len > imported.max_position:
      raise ValueError(
        f"data.seq_len={config.data.seq_len} exceeds the {imported.max_position} positions of "
        f"model.init_from={m.init_from}; lower data.seq_len."
      )
    return bert.Bert(
      dataclasses.replace(
        imported, dropout=m.dropout, attention_dropout=m.dropout, dtype=jnp.dtype(m.dtype)
      )
    )
  sizes = {k: m[k] for k in ("num_layers", "hidden", "num_heads", "intermediate") if m[k] > 0}
  return bert.Bert(
    bert.BertConfig.preset(
      m.size,
      vocab_size,
      max_position=m.max_position or max(config.data.seq_len, 512),
      dropout=m.dropout,
      attention_dropout=m.dropout,
      dtype=jnp.dtype(m.dtype),
      **sizes,
    )
  )


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with linear warmup to train.learning_rate, linear decay to 0 at train.steps; no
  weight decay on LayerNorm parameters and biases (`bert.weight_decay_mask`), as BERT."""
  t = config.train
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps),
      optax.linear_schedule(t.learning_rate, 0.0, max(t.steps - t.warmup_steps, 1)),
    ],
    [t.warmup_steps],
  )
  return optax.chain(
    optax.clip_by_global_norm(t.grad_clip),
    optax.adamw(schedule, weight_decay=t.weight_decay, mask=bert.weight_decay_mask),
  )


def init_fn(model, config):
  """key -> (params, {}) for the task."""
  T, P = config.data.seq_len, config.data.max_predictions

  if config.model.init_from:
    # Host arrays, closed over: the jitted init returns them as they are (for BERT-base that
    # embeds 0.4 GB of constants in one compile, paid once per run).
    params = hf_bert.load(config.model.init_from)[0]
    return lambda key: (params, {})

  def init(key):
    zeros = jnp.zeros((1, T), jnp.int32)
    variables = model.init(
      key, zeros, zeros, jnp.ones((1, T), bool), jnp.zeros((1, P), jnp.int32), train=False
    )
    return variables["params"], {}

  return init


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  tok, train_data, eval_batches = build_data(config, workdir)
  model = make_model(config, tok.vocab_size)
  baseline = unigram_baseline(train_data, eval_batches, tok.vocab_size)
  task = train.Task(
    init=init_fn(model, config),
    loss=make_loss(model, config, tok.mask_id),
    optimizer=make_optimizer(config),
    train_data=train_data,
    eval_data=lambda: eval_batches,
    extra_eval=lambda state: baseline,
  )
  _, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  B, T = config.train.batch_size, config.data.seq_len
  final["tokens_per_s"] = final.get("steps_per_s", 0.0) * B * T
  final["params"] = float(bert.param_count(model.config))
  return final


def _trained_model(config, workdir: str):
  """(model, params, tokenizer) of the run in `workdir`, in eval mode, from its checkpoint."""
  trained = restore.restore_params(workdir)
  path = config.data.vocab_file or os.path.join(workdir, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: the run's tokenizer is needed to read input.")
  tok = tokenizer_lib.from_vocab_txt(path) if config.data.vocab_file else tokenizer_lib.load(path)
  return make_model(config, tok.vocab_size), trained.params, tok


def predict(config, workdir: str, lines: list[str], *, top_k: int = 5) -> list[dict]:
  """Fill-mask for lines with [MASK]; P(second follows first) for 'first ||| second' lines."""
  model, params, tok = _trained_model(config, workdir)
  out = []
  for line in lines:
    if bert_predict.PAIR_SEPARATOR in line:
      (p,) = bert_predict.next_sentence_probability(model, params, tok, [line])
      out.append({"input": line, "is_next_probability": p})
    else:
      (slots,) = bert_predict.fill_mask(model, params, tok, [line], top_k=top_k)
      out.append({"input": line, "masks": slots})
  return out


def export(config, workdir: str, out_dir: str) -> str:
  """Writes the run as a Hugging Face BertForPreTraining directory; returns its path."""
  model, params, tok = _trained_model(config, workdir)
  vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
  return str(hf_bert.export(params, model.config, vocab, out_dir))
