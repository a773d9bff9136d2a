"""Encoder-decoder translation model (the TF seq2seq tutorial's), as pure functions over a dict.

The *cell size* D is the size of the state vector h (and of c for an LSTM): it fixes every
recurrent matrix and is independent of the input size, which only sets the rows of the input
kernel. The embedding matrix [V, E] turns a token id into the E-wide input vector (row lookup).
Letters: D is the cell size (as in `maskax.rnn.cells`; the tutorial calls it H), E the embedding
size, S source and T target steps, G = 3 gates (GRU) or 4 (LSTM), M = D (2D with a
bidirectional encoder) the width attention reads, l = 0 .. L-1 the layer:

  source_embedding   f32[V_s, E]          target_embedding  f32[V_t, E]
  encoder/layer_l    w_i f32[E or D (2D if bidirectional), G*D] (E for l = 0), b_i f32[G*D],
                     w_h f32[D, G*D], b_h f32[G*D]; {fwd, bwd} of these when bidirectional
  decoder/layer_l    w_i f32[E (+ M with bahdanau) or D, G*D], b_i, w_h f32[D, G*D], b_h
  attention luong    w f32[D, M]                                     score = h^T W m ('general')
            bahdanau w_query f32[D, D], w_memory f32[M, D], v f32[D]   score = v . tanh(Wq s + Wm m)
            both     combine_w f32[M + D, D], combine_b f32[D]         h~ = tanh([ctx; h] Wc + bc)
  output_w           f32[V_t, D] (one row per class, as sampled softmax wants), output_b f32[V_t]

`w_i` stacked on `w_h` is TF's fused gate kernel: [E + D, 3D] for a GRU layer on embeddings
(maskax.rnn.cells keeps two biases, as flax and PyTorch do). The decoder starts from the encoder's
final carry, layer by layer (a bidirectional encoder hands over carry_fwd + carry_bwd, so the
decoder keeps size D). Luong attention (Luong et al. 2015, no input feeding) attends from the
decoder's output h_t, so the decoder itself is one padded scan; Bahdanau attention (Bahdanau
et al. 2015) attends from s_{t-1} and feeds the context into the cell, so it runs step by step.
Padded source positions get no attention weight (the source mask); the loss counts real target
tokens only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from maskax.masking import losses, masks, sampling
from maskax.rnn import cells, decoding, scan
from maskax.masking.tokens import EOS, GO, PAD

ATTENTIONS = ("none", "luong", "bahdanau")
SOFTMAXES = ("full", "sampled")


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """Sizes and variants; `hidden` (D, the cell size) and `embed` (E) are separate knobs."""

  source_vocab: int
  target_vocab: int
  embed: int = 64
  hidden: int = 128
  layers: int = 1
  cell: str = "gru"
  bidirectional: bool = False
  attention: str = "luong"

  def __post_init__(self):
    if self.cell not in cells.GATES:
      raise ValueError(f"cell must be one of {sorted(cells.GATES)}, got {self.cell!r}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
    for name in ("source_vocab", "target_vocab", "embed", "hidden", "layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  @property
  def memory(self) -> int:
    """M: width of the encoder outputs that attention reads."""
    return 2 * self.hidden if self.bidirectional else self.hidden


def _cell_init(cell):
  return cells.init_gru if cell == "gru" else cells.init_lstm


def _normal(key, shape, fan_in):
  return jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)


def init_params(key, config: Seq2SeqConfig) -> dict:
  """Fresh parameters with the shapes in the module docstring."""
  c, D, E, M = config, config.hidden, config.embed, config.memory
  keys = iter(jax.random.split(key, 8 + 4 * c.layers))
  init = _cell_init(c.cell)
  params = {
    "source_embedding": _normal(next(keys), (c.source_vocab, E), E),
    "target_embedding": _normal(next(keys), (c.target_vocab, E), E),
    "encoder": {},
    "decoder": {},
    "output_w": _normal(next(keys), (c.target_vocab, D), D),
    "output_b": jnp.zeros((c.target_vocab,), jnp.float32),
  }
  for l in range(c.layers):
    width = E if l == 0 else M
    if c.bidirectional:
      params["encoder"][f"layer_{l}"] = {
        "fwd": init(next(keys), width, D),
        "bwd": init(next(keys), width, D),
      }
    else:
      params["encoder"][f"layer_{l}"] = init(next(keys), width, D)
    width = (E + (M if c.attention == "bahdanau" else 0)) if l == 0 else D
    params["decoder"][f"layer_{l}"] = init(next(keys), width, D)
  if c.attention == "luong":
    params["attention"] = {"w": _normal(next(keys), (D, M), M)}
  elif c.attention == "bahdanau":
    params["attention"] = {
      "w_query": _normal(next(keys), (D, D), D),
      "w_memory": _normal(next(keys), (M, D), M),
      "v": _normal(next(keys), (D,), D),
    }
  if c.attention != "none":
    params["attention"]["combine_w"] = _normal(next(keys), (M + D, D), M + D)
    params["attention"]["combine_b"] = jnp.zeros((D,), jnp.float32)
  return params


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def _layers(tree, config):
  layers = [tree[f"layer_{l}"] for l in range(config.layers)]
  return [(p["fwd"], p["bwd"]) for p in layers] if "fwd" in layers[0] else layers


def _embed(table, ids, valid):
  """Rows of table f32[V, E] for ids i32[...]; invalid ids (garbage) read row 0 instead."""
  return jnp.take(table, jnp.where(valid, ids, 0), axis=0)


def encode(params, config: Seq2SeqConfig, source, source_len):
  """Runs the encoder over a padded source batch.

  source i32[B, S] (anything past each length), source_len i32[B].
  Returns (memory, state): memory {values f32[B, S, M] (0 at padding), keys f32[B, S, D],
  mask bool[B, S]} for attention; state, the decoder's initial carry per layer (f32[B, D], or
  (c, h) for an LSTM): the encoder's final carries, frozen at each length.
  """
  source, source_len = jnp.asarray(source), jnp.asarray(source_len)
  if source.ndim != 2 or source_len.shape != source.shape[:1]:
    raise ValueError(
      f"source must be i32[B, S] and source_len i32[B], got {source.shape} and {source_len.shape}"
    )
  mask = masks.sequence_mask(source_len, source.shape[1])
  x = _embed(params["source_embedding"], source, mask)
  values, carries = scan.stacked_scan(
    _layers(params["encoder"], config),
    x,
    source_len,
    cell=config.cell,
    bidirectional=config.bidirectional,
  )
  if config.bidirectional:
    carries = [jax.tree.map(jnp.add, fwd, bwd) for fwd, bwd in carries]
  if config.attention == "luong":
    keys = values @ params["attention"]["w"].T  # h^T W m = h . (W m): one matmul per source
  elif config.attention == "bahdanau":
    keys = values @ params["attention"]["w_memory"]
  else:
    keys = jnp.zeros(values.shape[:2] + (0,), values.dtype)
  return {"values": values, "keys": keys, "mask": mask}, list(carries)


def attend(params, config: Seq2SeqConfig, query, memory):
  """Context vectors: attention of query f32[B, ..., D] over memory -> f32[B, ..., M].

  Padded source positions get weight exactly 0; a source with no valid position gives 0.
  """
  keys, mask = memory["keys"], memory["mask"]
  lead = query.ndim - 2  # extra query axes between B and D (T when teacher forcing)
  if config.attention == "luong":
    scores = jnp.einsum("b...h,bsh->b...s", query, keys)
  else:
    p = params["attention"]
    q = (query @ p["w_query"])[..., None, :]
    scores = jnp.tanh(q + keys.reshape(keys.shape[:1] + (1,) * lead + keys.shape[1:])) @ p["v"]
  mask_ = mask.reshape(mask.shape[:1] + (1,) * lead + mask.shape[1:])
  scores = jnp.where(mask_, scores, jnp.finfo(scores.dtype).min)
  weights = jnp.where(mask_, jax.nn.softmax(scores, axis=-1), 0.0)
  values = memory["values"]
  return jnp.einsum("b...s,bsm->b...m", weights, values)


def _combine(params, ctx, h):
  p = params["attention"]
  return jnp.tanh(
    cells.add_bias(jnp.concatenate([ctx, h], axis=-1) @ p["combine_w"], p["combine_b"])
  )


def decode_step(params, config: Seq2SeqConfig, memory, state, token):
  """One decoder step: token i32[B] (the previous output, GO first) and state (per layer).

  Returns (features f32[B, D] for `logits`, new state).
  """
  x = _embed(params["target_embedding"], token, jnp.ones(token.shape, bool))
  if config.attention == "bahdanau":
    query = cells.hidden_state(config.cell, state[-1])
    x = jnp.concatenate([x, attend(params, config, query, memory)], axis=-1)
  new_state = []
  for layer, carry in zip(_layers(params["decoder"], config), state):
    carry, x = cells.cell_step(config.cell, layer, carry, x)
    new_state.append(carry)
  if config.attention == "luong":
    x = _combine(params, attend(params, config, x, memory), x)
  elif config.attention == "bahdanau":
    x = _combine(
      params, attend(params, config, cells.hidden_state(config.cell, new_state[-1]), memory), x
    )
  return x, new_state


def logits(params, features):
  """Output projection: features f32[..., D] -> f32[..., V_t]."""
  return cells.add_bias(features @ params["output_w"].T, params["output_b"])


def teacher_forced(params, config: Seq2SeqConfig, source, source_len, target_in, target_len):
  """Decoder features for every target step, fed the reference tokens.

  source i32[B, S], source_len i32[B], target_in i32[B, T] (GO y_1 ... y_n, then anything),
  target_len i32[B]. Returns f32[B, T, D]; 0 at t >= target_len.
  """
  memory, state = encode(params, config, source, source_len)
  T = target_in.shape[1]
  valid = masks.sequence_mask(target_len, T)
  if config.attention == "bahdanau":  # the context enters the cell: step by step

    def step(state, inputs):
      token, ok = inputs
      out, new = decode_step(params, config, memory, state, jnp.where(ok, token, 0))
      state = jax.tree.map(lambda n, o: jnp.where(ok[:, None], n, o), new, state)
      return state, jnp.where(ok[:, None], out, 0.0)

    _, out_TBH = lax.scan(step, state, (target_in.T, valid.T))
    return jnp.swapaxes(out_TBH, 0, 1)
  x = _embed(params["target_embedding"], target_in, valid)
  h, _ = scan.stacked_scan(
    _layers(params["decoder"], config), x, target_len, cell=config.cell, initial_carry=state
  )
  if config.attention == "luong":
    h = jnp.where(valid[..., None], _combine(params, attend(params, config, h, memory), h), 0.0)
  return h


def sequence_loss(
  params,
  config: Seq2SeqConfig,
  batch,
  *,
  softmax: str = "full",
  mode: str = "token_mean",
  key=None,
  num_sampled: int = 512,
  candidates=None,
):
  """Masked cross-entropy over the real target tokens (y_1 ... y_n EOS), plus token accuracy.

  batch: source i32[B, S], source_len i32[B], target_in / target_out i32[B, T], target_len
  i32[B], and optionally valid bool[B] (False rows count nothing). softmax 'full' or 'sampled'
  (`sampling.sampled_softmax_loss` with `num_sampled` log-uniform candidates from `key`, or the
  given `candidates`; token_mean only; no accuracy, which would need the full logits).
  Returns {"xent": (total, weight), "token_accuracy": (total, weight) (full softmax only)}.
  """
  if softmax not in SOFTMAXES:
    raise ValueError(f"softmax must be one of {SOFTMAXES}, got {softmax!r}")
  feats = teacher_forced(
    params, config, batch["source"], batch["source_len"], batch["target_in"], batch["target_len"]
  )
  labels = batch["target_out"]
  mask = masks.sequence_mask(batch["target_len"], labels.shape[1])
  if "valid" in batch:
    mask = mask & batch["valid"][:, None]
  if softmax == "full":
    out = logits(params, feats)
    return {
      "xent": losses.masked_xent(out, labels, mask, mode=mode),
      "token_accuracy": losses.masked_accuracy(out, labels, mask),
    }
  if mode != "token_mean":
    raise ValueError(
      f"sampled softmax gives a token mean only; use loss.mode=token_mean, got {mode!r}"
    )
  D = feats.shape[-1]
  xent = sampling.sampled_softmax_loss(
    feats.reshape(-1, D),
    params["output_w"],
    params["output_b"],
    labels.reshape(-1),
    mask.reshape(-1),
    key=key,
    num_sampled=num_sampled,
    candidates=candidates,
  )
  return {"xent": xent}


def make_loss(config: Seq2SeqConfig, *, softmax: str, mode: str, num_sampled: int):
  """A training-loop loss `(params, model_state, batch, key, *, train) -> (terms, metrics,
  model_state)`: `sequence_loss` with `softmax` in training and the full softmax in evaluation;
  the term is {"xent"}, token accuracy a logged metric."""
  if softmax == "sampled" and num_sampled >= config.target_vocab:
    raise ValueError(
      f"loss.num_sampled={num_sampled} must be below the target "
      f"vocabulary ({config.target_vocab}); raise data.vocab_size or use full softmax"
    )

  def loss(params, model_state, batch, key, *, train):
    out = sequence_loss(
      params,
      config,
      batch,
      softmax=softmax if train else "full",
      mode=mode,
      key=key,
      num_sampled=num_sampled,
    )
    return {"xent": out["xent"]}, {k: v for k, v in out.items() if k != "xent"}, model_state

  return loss


def step_fn(config: Seq2SeqConfig):
  """The `decoding` step function: (params, memory, state, token) -> (logits, state)."""

  def step(params, memory, state, token):
    features, state = decode_step(params, config, memory, state, token)
    return logits(params, features), state

  return step


def translate(
  params,
  config: Seq2SeqConfig,
  source,
  source_len,
  *,
  max_len: int,
  beam_width: int = 1,
  length_penalty: float = 0.6,
) -> decoding.Decoded:
  """Greedy (beam_width = 1) or beam-search translations of a ragged source batch.

  source i32[B, S], source_len i32[B]. Returns `decoding.Decoded` with tokens i32[B, max_len]:
  the target ids up to and including EOS, then PAD. Jit with config, max_len, beam_width static.
  """
  memory, state = encode(params, config, source, source_len)
  options = dict(max_len=max_len, go_id=GO, eos_id=EOS, pad_id=PAD)
  if beam_width == 1:
    return decoding.greedy_decode(step_fn(config), params, memory, state, **options)
  return decoding.beam_search(
    step_fn(config),
    params,
    memory,
    state,
    beam_width=beam_width,
    length_penalty=length_penalty,
    **options,
  )


def make_decoder(
  config: Seq2SeqConfig, *, max_len: int, beam_width: int = 1, length_penalty: float = 0.6
):
  """`decode(params, source, source_len) -> decoding.Decoded`: `translate` jitted once for
  these options (it compiles once per source shape). beam_width 1 is greedy."""
  if beam_width < 1:
    raise ValueError(f"decode.beam_width={beam_width}: use 1 (greedy) or more.")
  translate_ = functools.partial(
    translate,
    config=config,
    max_len=max_len,
    beam_width=beam_width,
    length_penalty=length_penalty,
  )
  return jax.jit(
    lambda params, source, source_len: translate_(params, source=source, source_len=source_len)
  )


def decode_scores(decode, params, batches, target_vocab, *, long_threshold: int):
  """Decodes every held-out batch and scores the real rows (`valid`) against `target_out`.

  decode: from `make_decoder`; batches: dicts with source i32[B, S], source_len i32[B],
  target_out i32[B, T] and valid bool[B]; target_vocab: a `maskax.data.translation.Vocabulary`.
  Returns ({exact_match, exact_len_short, exact_len_long, bleu}, hypotheses as word lists in
  row order), where `_long` counts sources longer than `long_threshold` (NaN for an empty group).
  """
  hyps, refs, long = [], [], []
  for b in batches:
    tokens = np.asarray(decode(params, b["source"], b["source_len"]).tokens)
    for row in np.flatnonzero(b["valid"]):
      hyps.append(target_vocab.decode(tokens[row]))
      refs.append(target_vocab.decode(b["target_out"][row]))
      long.append(b["source_len"][row] > long_threshold)
  exact, long = np.array(decoding.exact_match(hyps, refs)), np.array(long, bool)
  mean = lambda x: float(x.mean()) if x.size else float("nan")
  scores = {
    "exact_match": mean(exact),
    "exact_len_short": mean(exact[~long]),
    "exact_len_long": mean(exact[long]),
    "bleu": decoding.corpus_bleu(hyps, refs),
  }
  return scores, hyps


def make_decode_eval(
  config: Seq2SeqConfig,
  batches,
  source_vocab,
  target_vocab,
  *,
  max_len: int,
  beam_width: int,
  length_penalty: float,
  long_threshold: int,
  log_examples: int,
):
  """`extra_eval(state) -> {name: float}` for the training loop: greedy decoding of every
  held-out batch scored by `decode_scores`, and with beam_width > 1 beam search too
  (`exact_match_beam`, `bleu_beam`). Logs the first `log_examples` greedy translations."""
  greedy = make_decoder(config, max_len=max_len)
  beam = beam_width > 1 and make_decoder(
    config, max_len=max_len, beam_width=beam_width, length_penalty=length_penalty
  )
  score = functools.partial(
    decode_scores, batches=batches, target_vocab=target_vocab, long_threshold=long_threshold
  )

  def extra_eval(state):
    out, hyps = score(greedy, state.params)
    b = batches[0]
    for row in range(min(log_examples, len(b["source"]))):
      source = source_vocab.decode(b["source"][row][: b["source_len"][row]])
      logging.info("translate %r -> %r", " ".join(source), " ".join(hyps[row]))
    if beam:
      beamed, _ = score(beam, state.params)
      out.update({"exact_match_beam": beamed["exact_match"], "bleu_beam": beamed["bleu"]})
    return out

  return extra_eval
