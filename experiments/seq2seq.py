"""Seq2seq (TF tutorial): what a cell's size is, embedding vs cell size, a 40k-word softmax.

Trains the encoder-decoder of `maskax.models.seq2seq` on a generated translation task: English
number names in four styles -> digits with thousands separators (`maskax.data.translation`),
or on a user's tab-separated parallel text (`--config.data.path=FILE`). The cell size D is the
size of the state h (and c for an LSTM): every recurrent matrix is [., G*D] whatever the input
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

import os

import jax
import ml_collections
import numpy as np
import optax

from experiments import common
from maskax.data import iterators, translation
from maskax.models import seq2seq
from maskax.training import evaluation, paths, restore, train

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
  arg = common.preset(arg, PRESETS)
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
  c.model.hidden = 128  # D, cell size: the state vector h (and c)
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


def _pairs(config) -> tuple[list, list]:
  """(training pairs, held-out pairs) of token lists, from the generator or the user's file."""
  d = config.data
  if d.path:
    return translation.split_pairs(translation.load_tsv(d.path), d.eval_fraction, seed=d.seed)
  styles = tuple(s.strip() for s in d.styles.split(","))
  return translation.number_pairs(
    d.num_train, d.num_eval, seed=d.seed, max_digits=d.max_digits, styles=styles
  )


def make_data(config) -> translation.TranslationData:
  """Vocabularies, training arrays and held-out batches in source-length buckets."""
  d = config.data
  train_pairs, eval_pairs = _pairs(config)
  return translation.make_data(
    train_pairs,
    eval_pairs,
    vocab_size=d.vocab_size,
    vocab_seed=d.seed,
    max_source_len=d.max_source_len,
    max_target_len=d.max_target_len,
    batch_size=config.train.batch_size,
    num_buckets=d.num_buckets,
  )


def make_model(config, source_vocab: int, target_vocab: int) -> seq2seq.Seq2SeqConfig:
  """The model's sizes: config.model's keys are `Seq2SeqConfig`'s fields."""
  return seq2seq.Seq2SeqConfig(
    source_vocab=source_vocab, target_vocab=target_vocab, **config.model.to_dict()
  )


def make_loss(mc, config):
  c = config.loss
  return seq2seq.make_loss(mc, softmax=c.softmax, mode=c.mode, num_sampled=c.num_sampled)


def make_extra_eval(mc, config, data: translation.TranslationData):
  """Greedy (and beam) decoding of every held-out batch: exact match, BLEU, by source length."""
  return seq2seq.make_decode_eval(
    mc,
    data.eval_batches,
    data.source_vocab,
    data.target_vocab,
    max_len=config.data.max_target_len + 1,
    long_threshold=config.data.long_threshold,
    **config.decode.to_dict(),  # beam_width, length_penalty, log_examples
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  data = make_data(config)
  if jax.process_index() == 0:  # saved with the run: predict() must not depend on the data
    paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
    vocabs = (data.source_vocab, data.target_vocab)
    translation.save_vocabularies(os.path.join(workdir, VOCAB_FILE), *vocabs)
  mc = make_model(config, len(data.source_vocab), len(data.target_vocab))
  B = config.train.batch_size
  loss = make_loss(mc, config)
  task = train.Task(
    init=lambda key: (seq2seq.init_params(key, mc), {}),
    loss=loss,
    optimizer=optax.chain(
      optax.clip_by_global_norm(config.train.grad_clip), optax.adam(config.train.learning_rate)
    ),
    train_data=iterators.ArrayBatches(data.train, B, config.seed, **common.this_process()),
    eval_data=lambda: data.eval_batches,
    extra_eval=make_extra_eval(mc, config, data),
  )
  state, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  real_tokens = float(np.mean(data.train["source_len"] + data.train["target_len"]))
  rate = final.get("steps_per_s", float("nan"))
  final.update(
    {
      "params": float(seq2seq.param_count(state.params)),
      "step_ms": 1000.0 / rate if rate else float("nan"),
      "tokens_per_s": common.per_second(final, B * real_tokens),
      "eval_shapes": float(data.eval_shapes),
      "source_vocab": float(len(data.source_vocab)),
      "target_vocab": float(len(data.target_vocab)),
    }
  )
  if config.report.train_memory:
    batch = {k: v[:B] for k, v in data.train.items()}
    final["train_temp_mb"] = evaluation.train_temp_mb(loss, state.params, {}, batch)
  return final


def predict(config, workdir: str, lines: list[str]) -> list[dict]:
  """Translates each line, a source sentence of whitespace-separated words, greedily
  (decode.beam_width = 1) or by beam search (PREDICT_KEYS): one {"source", "prediction"} per
  line. Words outside the run's source vocabulary are a ValueError naming them. A run trained
  before WORKDIR/vocab.json was saved gets its vocabularies rebuilt from the data."""
  params = restore.restore_params(workdir).params
  src_vocab, tgt_vocab = translation.saved_vocabularies(
    os.path.join(workdir, VOCAB_FILE),
    lambda: translation.build_vocabularies(
      _pairs(config)[0], size=config.data.vocab_size, seed=config.data.seed
    ),
  )
  source, source_len = translation.encode_sources([line.split() for line in lines], src_vocab)
  decode = seq2seq.make_decoder(
    make_model(config, len(src_vocab), len(tgt_vocab)),
    max_len=config.data.max_target_len + 1,
    beam_width=config.decode.beam_width,
    length_penalty=config.decode.length_penalty,
  )
  tokens = np.asarray(decode(params, source, source_len).tokens)
  return [
    {"source": line, "prediction": " ".join(tgt_vocab.decode(row))}
    for line, row in zip(lines, tokens)
  ]
