"""Seq2seq (TF tutorial): what a cell's size is, embedding vs cell size, a 40k-word softmax.

Trains the encoder-decoder of `maskax.models.seq2seq` on a generated translation task: English
number names in four styles -> digits with thousands separators (`maskax.data.translation`),
or on a user's tab-separated parallel text (`--config.data.path=FILE`). The cell size H is the
size of the state h (and c for an LSTM): every recurrent matrix is [., G*H] whatever the input
width E, which only sets the rows of the input kernel; the notes list every shape.

  python launch.py --config=experiments/seq2seq.py                  # default: learns in minutes
  python launch.py --config=experiments/seq2seq.py:cells --sweep=model.hidden=64,128,256,512,1024
  python launch.py --config=experiments/seq2seq.py:cells --sweep=model.embed=16,64,256
  python launch.py --config=experiments/seq2seq.py:vocab40k --sweep=loss.softmax=full,sampled
  python launch.py --config=experiments/seq2seq.py:long --sweep=model.attention=none,luong,bahdanau
  echo "four thousand and two" | python launch.py --config=experiments/seq2seq.py \
      --workdir=runs/seq2seq/default --predict=- --config.decode.beam_width=1   # translate lines

Training uses one padded shape per preset (the loop compiles one train_step); held-out batches
are grouped into `data.num_buckets` source-length buckets, so evaluation and decoding compile
once per bucket (logged). Hardware: a 2-core CPU. The default takes about 65 s on a quiet
one (21 ms/step; 56 s compiling and training, the rest data and evaluation) and reaches a
held-out exact match of 0.956, BLEU 98.7, token accuracy 0.995 (measured; chance is ~1e-9: the
answer is one digit string out of up to 10^9). Ablation tables: the README's seq2seq section.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import common
from maskax.rnn import decoding
from maskax.training import restore, train
from maskax.data import iterators, translation
from maskax.models import seq2seq

PRESETS = {
  "default": "GRU 128 + Luong attention, numbers up to 9 digits, 1,500 steps (~65 s, 2-core CPU)",
  "cells": "as default, 400 steps, greedy only: for the cell-size and embedding-size sweeps",
  "vocab40k": "vocabularies padded to 40,000 words, 300 steps: full vs sampled softmax",
  "long": "numbers up to 12 digits (sources up to 22 tokens), 1,000 steps: attention sweep",
  "smoke": "tiny model on 4-digit numbers, 4 steps, checkpoint every 2 (seconds; tests)",
}
REPORT_METRICS = (
  "params",
  "step_ms",
  "tokens_per_s",
  "train_temp_mb",
  "loss",
  "eval/xent",
  "eval/token_accuracy",
  "eval/exact_match",
  "eval/exact_len_short",
  "eval/exact_len_long",
  "eval/bleu",
  "eval/exact_match_beam",
)
RESUME_SAFE_KEYS = ("decode",)
# Keys --predict takes from the command line instead of the trained run (launch.trained_config).
PREDICT_KEYS = ("decode.beam_width", "decode.length_penalty")
VOCAB_FILE = "vocab.json"  # in the workdir: both vocabularies, written when training starts


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; presets: {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, batch order and sampled-softmax candidates derive from it
  c.data = ml_collections.ConfigDict()
  c.data.seed = 0  # the pairs, the held-out split and the vocabularies: the same for every
  # training seed, so seed spread measures the model, not a different test set
  c.data.path = ""  # '' = generated numbers task; else a UTF-8 'source<TAB>target' file
  c.data.eval_fraction = 0.05  # held-out share of a user's file (the generated task uses num_eval)
  c.data.max_digits = 9  # generated numbers have 1..max_digits digits (12 at most)
  c.data.styles = "british,american,digits,mixed"  # source styles, comma-separated
  c.data.num_train = 50000  # generated training pairs (fixed set, shuffled epochs)
  c.data.num_eval = 1024  # generated held-out pairs, numbers disjoint from training
  c.data.vocab_size = 0  # 0 = every training word; N = exactly N ids per side (cap or pad)
  c.data.max_source_len = 16  # S, padded source length; longer pairs are dropped
  c.data.max_target_len = 11  # target tokens before EOS; longer pairs are dropped
  c.data.num_buckets = 4  # held-out source-length buckets (compiled eval/decode shapes)
  c.data.long_threshold = 8  # eval/exact_len_long counts sources longer than this
  c.model = ml_collections.ConfigDict()
  c.model.cell = "gru"  # gru | lstm
  c.model.embed = 64  # E, embedding size (rows of the input kernel)
  c.model.hidden = 128  # H, cell size: the state vector h (and c)
  c.model.layers = 1  # stacked layers in encoder and decoder
  c.model.bidirectional = False  # bidirectional encoder (carry handed over as fwd + bwd)
  c.model.attention = "luong"  # none | luong | bahdanau
  c.loss = ml_collections.ConfigDict()
  c.loss.mode = "token_mean"  # token_mean | sequence_mean (the legacy tutorial)
  c.loss.softmax = "full"  # full | sampled (training only; evaluation is always full)
  c.loss.num_sampled = 512  # sampled-softmax candidates per step (log-uniform, unique)
  c.decode = ml_collections.ConfigDict()
  c.decode.beam_width = 4  # beam search at evaluation, besides greedy; --predict: 1 = greedy
  c.decode.length_penalty = 0.6  # GNMT alpha for the final choice among beams
  c.decode.log_examples = 3  # held-out translations written to the log at each evaluation
  c.report = ml_collections.ConfigDict()
  c.report.train_memory = False  # compile the gradient once more to report its temp memory
  c.train = common.train_config()  # + the loop's shared defaults (experiments/common.py)
  c.train.steps = 1500
  c.train.batch_size = 64  # global
  c.train.learning_rate = 3e-3  # Adam
  c.train.grad_clip = 1.0  # global-norm clipping, as the tutorial (max_gradient_norm)
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  if arg == "cells":
    c.train.steps = 400
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.checkpoint_every = 400
    c.decode.beam_width = 1
  elif arg == "vocab40k":
    c.data.vocab_size = 40000
    c.train.steps = 300
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.checkpoint_every = 300
    c.decode.beam_width = 1
    c.report.train_memory = True
  elif arg == "long":
    c.data.max_digits = 12
    c.data.max_source_len = 22
    c.data.max_target_len = 15
    c.data.long_threshold = 11
    c.train.steps = 1000
    c.train.eval_every = 250
    c.train.checkpoint_every = 1000
    c.decode.beam_width = 1
  elif arg == "smoke":
    c.data.max_digits = 4
    c.data.num_train = 256
    c.data.num_eval = 32
    c.data.max_source_len = 8
    c.data.max_target_len = 5
    c.data.num_buckets = 2
    c.data.long_threshold = 4
    c.model.embed = 8
    c.model.hidden = 16
    c.decode.beam_width = 2
    c.decode.log_examples = 1
    common.smoke_loop(c.train)
  return c


def load_pairs(config):
  """(train pairs, held-out pairs) of token lists, from the generator or the user's file."""
  d = config.data
  if d.path:
    pairs = translation.load_tsv(d.path)
    order = np.random.default_rng([d.seed, 5]).permutation(len(pairs))
    n_eval = max(1, int(round(len(pairs) * d.eval_fraction)))
    if n_eval >= len(pairs):
      raise ValueError(f"data.eval_fraction={d.eval_fraction} leaves no training pair")
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]
  styles = tuple(s.strip() for s in d.styles.split(","))
  train_pairs, numbers = translation.generate_numbers(
    d.num_train, seed=d.seed, max_digits=d.max_digits, styles=styles
  )
  eval_pairs, _ = translation.generate_numbers(
    d.num_eval, seed=d.seed + 1, max_digits=d.max_digits, styles=styles, exclude=frozenset(numbers)
  )
  return train_pairs, eval_pairs


def build_data(config):
  """Vocabularies, training arrays and bucketed held-out batches."""
  d = config.data
  train_pairs, eval_pairs = load_pairs(config)
  src_vocab, tgt_vocab = vocabularies(config, train_pairs)
  lengths = dict(max_source_len=d.max_source_len, max_target_len=d.max_target_len)
  train_arrays, dropped = translation.encode_pairs(train_pairs, src_vocab, tgt_vocab, **lengths)
  eval_arrays, eval_dropped = translation.encode_pairs(eval_pairs, src_vocab, tgt_vocab, **lengths)
  logging.info(
    "vocabularies: source %d ids (%d real), target %d ids (%d real); pairs: %d train, "
    "%d held out; dropped as too long: %d train, %d held out",
    len(src_vocab),
    src_vocab.num_real,
    len(tgt_vocab),
    tgt_vocab.num_real,
    len(train_arrays["source"]),
    len(eval_arrays["source"]),
    dropped,
    eval_dropped,
  )
  if not len(eval_arrays["source"]):
    raise ValueError("no held-out pair fits data.max_source_len / data.max_target_len")
  boundaries = iterators.bucket_boundaries(d.max_source_len, d.num_buckets)
  eval_batches = translation.bucket_batches(eval_arrays, config.train.batch_size, boundaries)
  shapes = sorted({b["source"].shape for b in eval_batches})
  logging.info(
    "held-out source buckets %s: %d compiled shapes each for eval_step and decoding "
    "(training: one shape [%d, %d])",
    boundaries,
    len(shapes),
    config.train.batch_size,
    d.max_source_len,
  )
  return src_vocab, tgt_vocab, train_arrays, eval_batches, len(shapes)


def vocabularies(config, train_pairs) -> tuple[translation.Vocabulary, translation.Vocabulary]:
  """(source, target) vocabularies of the training pairs."""
  d = config.data
  return (
    translation.build_vocabulary(
      [s for s, _ in train_pairs], size=d.vocab_size, lexicon_seed=d.seed
    ),
    translation.build_vocabulary(
      [t for _, t in train_pairs], size=d.vocab_size, lexicon_seed=d.seed + 1
    ),
  )


def saved_vocabularies(config, workdir: str):
  """The run's (source, target) vocabularies: WORKDIR/vocab.json, or for a run trained before
  it was saved, rebuilt from the data as training built them (deterministic in config.data)."""
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):
    return translation.load_vocabularies(path)
  logging.warning(
    "%s is missing (a run from before vocabularies were saved): rebuilding them from the data", path
  )
  return vocabularies(config, load_pairs(config)[0])


def model_config(config, src_vocab, tgt_vocab) -> seq2seq.Seq2SeqConfig:
  m = config.model
  return seq2seq.Seq2SeqConfig(
    source_vocab=len(src_vocab),
    target_vocab=len(tgt_vocab),
    embed=m.embed,
    hidden=m.hidden,
    layers=m.layers,
    cell=m.cell,
    bidirectional=m.bidirectional,
    attention=m.attention,
  )


def make_loss(mc, config):
  if config.loss.softmax == "sampled" and config.loss.num_sampled >= mc.target_vocab:
    raise ValueError(
      f"loss.num_sampled={config.loss.num_sampled} must be below the target "
      f"vocabulary ({mc.target_vocab}); raise data.vocab_size or use full softmax"
    )

  def loss(params, model_state, batch, key, *, train):
    out = seq2seq.sequence_loss(
      params,
      mc,
      batch,
      softmax=config.loss.softmax if train else "full",
      mode=config.loss.mode,
      key=key,
      num_sampled=config.loss.num_sampled,
    )
    return {"xent": out["xent"]}, {k: v for k, v in out.items() if k != "xent"}, model_state

  return loss


def make_extra_eval(mc, config, tgt_vocab, src_vocab, eval_batches):
  """Greedy (and beam) decoding of every held-out batch: exact match, BLEU, by source length."""
  max_len = config.data.max_target_len + 1
  greedy = jax.jit(functools.partial(seq2seq.translate, config=mc, max_len=max_len))
  beam = jax.jit(
    functools.partial(
      seq2seq.translate,
      config=mc,
      max_len=max_len,
      beam_width=config.decode.beam_width,
      length_penalty=config.decode.length_penalty,
    )
  )

  def score(decode, params):
    hyps, refs, long = [], [], []
    for b in eval_batches:
      tokens = np.asarray(decode(params, source=b["source"], source_len=b["source_len"]).tokens)
      for row in np.flatnonzero(b["valid"]):
        hyps.append(tgt_vocab.decode(tokens[row]))
        refs.append(tgt_vocab.decode(b["target_out"][row]))
        long.append(b["source_len"][row] > config.data.long_threshold)
    exact, long = np.array(decoding.exact_match(hyps, refs)), np.array(long)
    mean = lambda x: float(x.mean()) if x.size else float("nan")
    return {
      "exact_match": mean(exact),
      "exact_len_short": mean(exact[~long]),
      "exact_len_long": mean(exact[long]),
      "bleu": decoding.corpus_bleu(hyps, refs),
    }, hyps

  def extra_eval(state):
    out, hyps = score(greedy, state.params)
    b = eval_batches[0]
    for row in range(min(config.decode.log_examples, len(b["source"]))):
      source = src_vocab.decode(b["source"][row][: b["source_len"][row]])
      logging.info("translate %r -> %r", " ".join(source), " ".join(hyps[row]))
    if config.decode.beam_width > 1:
      beamed, _ = score(beam, state.params)
      out.update({"exact_match_beam": beamed["exact_match"], "bleu_beam": beamed["bleu"]})
    return out

  return extra_eval


def train_memory_mb(loss_fn, params, batch) -> float:
  """Temporary memory (MB) XLA allocates for one gradient of the training loss on `batch`."""

  def objective(p):
    ((total, weight),) = loss_fn(p, {}, batch, jax.random.key(0), train=True)[0].values()
    return total / weight

  compiled = jax.jit(jax.grad(objective)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  src_vocab, tgt_vocab, train_arrays, eval_batches, num_shapes = build_data(config)
  if jax.process_index() == 0:  # saved with the run: predict() must not depend on the data
    os.makedirs(workdir, exist_ok=True)
    translation.save_vocabularies(os.path.join(workdir, VOCAB_FILE), src_vocab, tgt_vocab)
  mc = model_config(config, src_vocab, tgt_vocab)
  train_data = iterators.ArrayBatches(
    train_arrays,
    config.train.batch_size,
    config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  loss = make_loss(mc, config)
  optimizer = optax.chain(
    optax.clip_by_global_norm(config.train.grad_clip), optax.adam(config.train.learning_rate)
  )
  task = train.Task(
    init=lambda key: (seq2seq.init_params(key, mc), {}),
    loss=loss,
    optimizer=optimizer,
    train_data=train_data,
    eval_data=lambda: eval_batches,
    extra_eval=make_extra_eval(mc, config, tgt_vocab, src_vocab, eval_batches),
  )
  state, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  real_tokens = float(np.mean(train_arrays["source_len"] + train_arrays["target_len"]))
  rate = final.get("steps_per_s", float("nan"))
  final.update(
    {
      "params": float(seq2seq.param_count(state.params)),
      "step_ms": 1000.0 / rate if rate else float("nan"),
      "tokens_per_s": rate * config.train.batch_size * real_tokens,
      "eval_shapes": float(num_shapes),
      "source_vocab": float(len(src_vocab)),
      "target_vocab": float(len(tgt_vocab)),
    }
  )
  if config.report.train_memory:
    batch = {k: v[: config.train.batch_size] for k, v in train_arrays.items()}
    final["train_temp_mb"] = train_memory_mb(loss, state.params, batch)
  return final


def predict(config, workdir: str, lines: list[str]) -> list[dict]:
  """Translates each line, a source sentence of whitespace-separated words, greedily
  (decode.beam_width = 1) or by beam search (PREDICT_KEYS): one {"source", "prediction"} per
  line. Words outside the run's source vocabulary are a ValueError naming them."""
  params = restore.restore_params(workdir).params
  src_vocab, tgt_vocab = saved_vocabularies(config, workdir)
  source, source_len = translation.encode_sources([line.split() for line in lines], src_vocab)
  if config.decode.beam_width < 1:
    raise ValueError(f"decode.beam_width={config.decode.beam_width}: use 1 (greedy) or more.")
  decode = jax.jit(
    functools.partial(
      seq2seq.translate,
      config=model_config(config, src_vocab, tgt_vocab),
      max_len=config.data.max_target_len + 1,
      beam_width=config.decode.beam_width,
      length_penalty=config.decode.length_penalty,
    )
  )
  tokens = np.asarray(decode(params, source=source, source_len=source_len).tokens)
  return [
    {"source": line, "prediction": " ".join(tgt_vocab.decode(row))}
    for line, row in zip(lines, tokens)
  ]
