"""Greedy and beam-search decoding over any step function, and corpus BLEU to score the output.

A model plugs in through `step_fn(params, context, state, token) -> (logits, state)`, with
token i32[B] (GO first), logits f32[B, V] and `state` any pytree whose leaves have a leading
batch axis; `context` (encoder memory, per row, never changed) is passed through. Both decoders
are one `lax.while_loop` that stops as soon as every row has emitted EOS, or after `max_len`
steps. A running row never emits GO or PAD; a finished row emits PAD, so the tokens of a row
are its prediction up to and including EOS, then PAD. Ragged sources need nothing special
here: the encoder's lengths already shaped `context` and `state`.
"""

from __future__ import annotations

import collections
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Decoded(NamedTuple):
  """tokens i32[B, L] (PAD after EOS), lengths i32[B] (tokens up to and including EOS, L if
  none), scores f32[B] (sum of log-probabilities of those tokens), steps i32[] (loop trips)."""

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  steps: jax.Array


def _check(max_len, eos_id, pad_id, go_id):
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"max_len must be a static int >= 1, got {max_len!r}")
  if len({eos_id, pad_id, go_id}) != 3:
    raise ValueError(f"go_id, eos_id and pad_id must differ, got {go_id}, {eos_id}, {pad_id}")


def _batch_size(state) -> int:
  leaves = jax.tree.leaves(state)
  if not leaves:
    raise ValueError("state must hold at least one array with a leading batch axis")
  return leaves[0].shape[0]


def _lengths(tokens, eos_id):
  """Tokens up to and including the first EOS per row (L when there is none): i32[B]."""
  L = tokens.shape[-1]
  first = jnp.argmax(tokens == eos_id, axis=-1)
  return jnp.where(jnp.any(tokens == eos_id, axis=-1), first + 1, L).astype(jnp.int32)


def _ban(logp, go_id, pad_id):
  """A running row never emits GO or PAD: logp f32[N, V] -> f32[N, V] with -inf there."""
  banned = (jnp.arange(logp.shape[-1]) == go_id) | (jnp.arange(logp.shape[-1]) == pad_id)
  return jnp.where(banned[None, :], -jnp.inf, logp)


def greedy_decode(
  step_fn: Callable,
  params,
  context,
  state,
  *,
  max_len: int,
  go_id: int,
  eos_id: int,
  pad_id: int = 0,
) -> Decoded:
  """Argmax decoding: context and state as `step_fn` takes them for B rows. Returns `Decoded`."""
  _check(max_len, eos_id, pad_id, go_id)
  B = _batch_size(state)

  def cond(carry):
    t, _, _, finished, _, _ = carry
    return (t < max_len) & ~jnp.all(finished)

  def body(carry):
    t, tokens, prev, finished, scores, state = carry
    logits, state = step_fn(params, context, state, prev)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.argmax(_ban(logp, go_id, pad_id), axis=-1).astype(jnp.int32)
    token = jnp.where(finished, pad_id, token)
    gained = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(finished, 0.0, gained)
    tokens = lax.dynamic_update_slice(tokens, token[:, None], (0, t))
    return t + 1, tokens, token, finished | (token == eos_id), scores, state

  init = (
    jnp.int32(0),
    jnp.full((B, max_len), pad_id, jnp.int32),
    jnp.full((B,), go_id, jnp.int32),
    jnp.zeros((B,), bool),
    jnp.zeros((B,), jnp.float32),
    state,
  )
  steps, tokens, _, _, scores, _ = lax.while_loop(cond, body, init)
  return Decoded(tokens, _lengths(tokens, eos_id), scores, steps)


def beam_search(
  step_fn: Callable,
  params,
  context,
  state,
  *,
  beam_width: int,
  max_len: int,
  go_id: int,
  eos_id: int,
  pad_id: int = 0,
  length_penalty: float = 0.6,
) -> Decoded:
  """Beam search with K = beam_width beams per row; returns the best beam as `Decoded`.

  Beams are ranked by the sum of log-probabilities while decoding (a finished beam keeps its
  score and extends only by PAD at no cost); the final choice among the K beams divides by
  GNMT's length penalty ((5 + length) / 6) ** length_penalty (Wu et al. 2016, eq. 14). With
  K = 1 this is greedy decoding. Requires V >= K.
  """
  _check(max_len, eos_id, pad_id, go_id)
  if not isinstance(beam_width, int) or beam_width < 1:
    raise ValueError(f"beam_width must be a static int >= 1, got {beam_width!r}")
  B, K = _batch_size(state), beam_width
  tile = lambda x: jnp.repeat(x, K, axis=0)  # row b * K + k is beam k of row b
  context, state = jax.tree.map(tile, context), jax.tree.map(tile, state)
  rows = jnp.arange(B)[:, None] * K

  def cond(carry):
    t, _, _, finished, _, _ = carry
    return (t < max_len) & ~jnp.all(finished)

  def body(carry):
    t, tokens, scores, finished, prev, state = carry
    logits, state = step_fn(params, context, state, prev)
    V = logits.shape[-1]
    logp = _ban(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), go_id, pad_id)
    logp = logp.reshape(B, K, V)
    only_pad = jnp.where(jnp.arange(V) == pad_id, 0.0, -jnp.inf)
    logp = jnp.where(finished[..., None], only_pad[None, None, :], logp)
    top, index = lax.top_k((scores[..., None] + logp).reshape(B, K * V), K)
    beam, token = index // V, (index % V).astype(jnp.int32)
    tokens = jnp.take_along_axis(tokens, beam[..., None], axis=1)
    tokens = lax.dynamic_update_slice(tokens, token[..., None], (0, 0, t))
    finished = jnp.take_along_axis(finished, beam, axis=1) | (token == eos_id)
    state = jax.tree.map(lambda s: s[(rows + beam).reshape(-1)], state)
    return t + 1, tokens, top, finished, token.reshape(-1), state

  first_only = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)
  init = (
    jnp.int32(0),
    jnp.full((B, K, max_len), pad_id, jnp.int32),
    jnp.broadcast_to(first_only[None, :], (B, K)),
    jnp.zeros((B, K), bool),
    jnp.full((B * K,), go_id, jnp.int32),
    state,
  )
  steps, tokens, scores, _, _, _ = lax.while_loop(cond, body, init)
  lengths = _lengths(tokens, eos_id)
  penalty = ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** length_penalty
  best = jnp.argmax(scores / penalty, axis=1)
  pick = lambda x: jnp.take_along_axis(x, best.reshape((B,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  return Decoded(pick(tokens), pick(lengths), pick(scores), steps)


def _ngrams(tokens, n):
  return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references, *, max_order: int = 4) -> float:
  """Corpus BLEU in [0, 100] with one reference per hypothesis (Papineni et al. 2002).

  hypotheses, references: sequences of token lists. Clipped n-gram matches and counts are
  summed over the corpus for n = 1..max_order, their precisions combined by a geometric mean,
  times the brevity penalty exp(1 - r / c) when the hypotheses are shorter (c < r). No
  smoothing: a corpus without a single matching max_order-gram scores 0.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  matches, totals = np.zeros(max_order), np.zeros(max_order)
  hyp_len = ref_len = 0
  for hyp, ref in zip(hypotheses, references):
    hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
    for n in range(1, max_order + 1):
      h, r = _ngrams(hyp, n), _ngrams(ref, n)
      matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
      totals[n - 1] += max(len(hyp) - n + 1, 0)
  if hyp_len == 0 or np.any(matches == 0):
    return 0.0
  log_precision = float(np.mean(np.log(matches / totals)))
  brevity = min(0.0, 1.0 - ref_len / hyp_len)
  return 100.0 * math.exp(log_precision + brevity)


def exact_match(hypotheses, references) -> list[bool]:
  """Whether each hypothesis token list equals its reference."""
  return [list(h) == list(r) for h, r in zip(hypotheses, references)]
