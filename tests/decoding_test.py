"""maskax.rnn.decoding: greedy and beam search over step functions, corpus BLEU."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskax.rnn import decoding
from maskax.models import seq2seq

PAD, GO, EOS = 0, 1, 2
V, L = 6, 6


def scripted_step(params, context, state, token):
  """Row b emits script[b, t] at step t (a big logit), whatever it was fed: a state counter."""
  del params, token
  t = state["t"]
  script = context["script"]  # i32[B, L]
  wanted = jnp.take_along_axis(script, jnp.minimum(t, L - 1)[:, None], axis=1)[:, 0]
  logits = jnp.where(jnp.arange(V)[None, :] == wanted[:, None], 5.0, 0.0)
  return logits, {"t": t + 1}


def test_greedy_stops_at_eos_and_pads_after_it():
  script = np.array([[3, 4, EOS, 5, 5, 5], [EOS, 3, 3, 3, 3, 3], [4, 4, 4, EOS, 3, 3]], np.int32)
  out = jax.jit(
    functools.partial(
      decoding.greedy_decode, scripted_step, max_len=L, go_id=GO, eos_id=EOS, pad_id=PAD
    )
  )(None, {"script": script}, {"t": jnp.zeros(3, jnp.int32)})
  np.testing.assert_array_equal(
    out.tokens,
    [[3, 4, EOS, PAD, PAD, PAD], [EOS, PAD, PAD, PAD, PAD, PAD], [4, 4, 4, EOS, PAD, PAD]],
  )
  np.testing.assert_array_equal(out.lengths, [3, 1, 4])
  assert int(out.steps) == 4  # the loop ends once every row has emitted EOS
  step_logp = 5.0 - math.log(math.exp(5.0) + V - 1)
  np.testing.assert_allclose(out.scores, np.array([3, 1, 4]) * step_logp, rtol=1e-5)


def test_no_eos_runs_to_max_len_and_never_emits_go_or_pad():
  def step(params, context, state, token):  # prefers PAD, then GO, then 3; EOS least
    logits = jnp.array([9.0, 8.0, -1.0, 1.0, 0.0, 0.0])
    return jnp.broadcast_to(logits, (token.shape[0], V)), state

  state = {"t": jnp.zeros(2, jnp.int32)}
  out = decoding.greedy_decode(step, None, None, state, max_len=L, go_id=GO, eos_id=EOS)
  assert int(out.steps) == L
  np.testing.assert_array_equal(out.lengths, [L, L])
  np.testing.assert_array_equal(out.tokens, np.full((2, L), 3))
  beamed = decoding.beam_search(
    step, None, None, state, beam_width=2, max_len=L, go_id=GO, eos_id=EOS
  )
  assert not np.isin(np.asarray(beamed.tokens), [PAD, GO]).any()


# A bigram "model": log P(next | previous) from a fixed table; greedy is short-sighted on it.
TABLE = np.full((V, V), -9.0, np.float32)
TABLE[GO, 3], TABLE[GO, 4] = math.log(0.55), math.log(0.45)
TABLE[3, [3, 4, 5, EOS]] = math.log(0.25)  # after 3: four equally likely continuations
TABLE[4, EOS] = TABLE[5, EOS] = 0.0  # after 4 or 5: EOS, almost surely


def bigram_step(params, context, state, token):
  del context
  return params[token], state


def _bigram(decode, **kw):
  state = {"dummy": jnp.zeros((1, 1))}
  return decode(bigram_step, jnp.asarray(TABLE), None, state, max_len=4, go_id=GO, eos_id=EOS, **kw)


def _best_by_enumeration(max_len):
  """The highest-probability EOS-terminated sequence (tokens 3..5, EOS) by brute force."""
  logp = jax.nn.log_softmax(jnp.asarray(TABLE), axis=-1)
  best = (-np.inf, None)
  for n in range(max_len):
    for body in itertools.product([3, 4, 5], repeat=n):
      seq = list(body) + [EOS]
      score = sum(float(logp[a, b]) for a, b in zip([GO] + seq, seq))
      best = max(best, (score, seq))
  return best


def test_beam_search_finds_the_best_sequence_greedy_misses():
  greedy = _bigram(decoding.greedy_decode)
  beam = _bigram(decoding.beam_search, beam_width=3, length_penalty=0.0)
  score, seq = _best_by_enumeration(4)
  assert int(greedy.tokens[0, 0]) == 3 and seq[0] == 4  # locally best, globally worse
  assert list(np.asarray(beam.tokens[0, : len(seq)])) == seq
  np.testing.assert_allclose(float(beam.scores[0]), score, rtol=1e-5)
  assert float(beam.scores[0]) > float(greedy.scores[0])


def test_beam_width_one_equals_greedy_on_the_bigram():
  greedy = _bigram(decoding.greedy_decode)
  beam = _bigram(decoding.beam_search, beam_width=1)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-6)


def test_wide_beam_is_exhaustive_and_tracks_each_beams_state():
  """A random trigram model keeps the token before last in its state; with K = 4^3 beams (every
  prefix of tokens 2..5 survives) beam search must return the brute-force best sequence, which
  it only does if each beam's state follows the beam when the beams are reordered."""
  rng = np.random.default_rng(0)
  table = rng.normal(size=(V, V, V)) * 2.0
  table[..., EOS] -= 6.0  # rare EOS: the best sequence is long, so step 3 needs the right state
  table = jnp.asarray(table, jnp.float32)

  def step(params, context, state, token):
    return params[state["before"], token], {"before": token}

  max_len = 4
  state = {"before": jnp.full((1,), GO, jnp.int32)}
  out = decoding.beam_search(
    step,
    table,
    None,
    state,
    beam_width=64,
    max_len=max_len,
    go_id=GO,
    eos_id=EOS,
    length_penalty=0.0,
  )
  logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
  best = (-np.inf, None)
  for seq in itertools.product([EOS, 3, 4, 5], repeat=max_len):
    seq = list(seq[: seq.index(EOS) + 1]) if EOS in seq else list(seq)
    context = [GO, GO] + seq
    score = sum(logp[context[i], context[i + 1], context[i + 2]] for i in range(len(seq)))
    best = max(best, (score, seq))
  got = list(np.asarray(out.tokens[0, : int(out.lengths[0])]))
  assert got == best[1] and len(got) >= 3
  np.testing.assert_allclose(float(out.scores[0]), best[0], rtol=1e-5)


@pytest.fixture(scope="module")
def model():
  config = seq2seq.Seq2SeqConfig(
    source_vocab=9,
    target_vocab=8,
    embed=6,
    hidden=8,
    attention="luong",
    bidirectional=True,
    cell="lstm",
  )
  params = jax.jit(seq2seq.init_params, static_argnums=1)(jax.random.key(1, impl="rbg"), config)
  # Larger weights than init so that the untrained model's choices are not near ties.
  params = jax.tree.map(lambda x: 3.0 * x, params)
  source = np.array([[4, 5, 6, 7, 8], [5, 4, 0, 0, 0], [8, 0, 0, 0, 0], [6, 6, 6, 0, 0]], np.int32)
  lengths = np.array([5, 2, 1, 3], np.int32)
  translate = jax.jit(seq2seq.translate, static_argnames=("config", "max_len", "beam_width"))
  return config, params, source, lengths, translate


def test_beam_width_one_equals_greedy_on_the_model(model):
  config, params, source, lengths, translate = model
  greedy = translate(params, config, source, lengths, max_len=7)
  beam = translate(params, config, source, lengths, max_len=7, beam_width=1)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)


def test_ragged_batch_decodes_like_each_row_alone(model):
  config, params, source, lengths, translate = model
  for beam_width in (1, 3):
    batch = translate(params, config, source, lengths, max_len=7, beam_width=beam_width)
    garbage = np.where(np.arange(5)[None] < lengths[:, None], source, 7)  # other pad ids
    again = translate(params, config, garbage, lengths, max_len=7, beam_width=beam_width)
    np.testing.assert_array_equal(again.tokens, batch.tokens)
    for row in range(len(source)):  # batch of one, same width: one compile per beam width
      alone = translate(
        params,
        config,
        source[row : row + 1],
        lengths[row : row + 1],
        max_len=7,
        beam_width=beam_width,
      )
      np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])


def test_corpus_bleu_counts():
  assert decoding.corpus_bleu([["a", "b", "c", "d"]], [["a", "b", "c", "d"]]) == pytest.approx(100)
  # Clipping: "the" counts at most as often as in the reference; c > r, so no brevity penalty.
  assert decoding.corpus_bleu([["the"] * 4], [["the", "cat"]], max_order=1) == pytest.approx(25)
  # p1..p4 = 4/5, 3/4, 2/3, 1/2; c = 5 < r = 6 gives exp(1 - 6/5).
  got = decoding.corpus_bleu([list("abcde")], [list("abcdfg")])
  want = 100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25 * math.exp(1 - 6 / 5)
  assert got == pytest.approx(want)
  # Corpus level: n-gram counts pooled over sentences, not averaged per sentence.
  got = decoding.corpus_bleu([["a", "b"], ["c"]], [["a", "b"], ["d"]], max_order=2)
  assert got == pytest.approx(100 * math.sqrt((2 / 3) * (1 / 1)))
  assert decoding.corpus_bleu([["x", "y"]], [["a", "b"]]) == 0.0
  assert decoding.exact_match([["1"], ["2"]], [["1"], ["3"]]) == [True, False]
  with pytest.raises(ValueError, match="references"):
    decoding.corpus_bleu([["a"]], [])


def test_bad_options_raise():
  state = {"t": jnp.zeros(1, jnp.int32)}
  with pytest.raises(ValueError, match="max_len"):
    decoding.greedy_decode(scripted_step, None, {}, state, max_len=0, go_id=GO, eos_id=EOS)
  with pytest.raises(ValueError, match="must differ"):
    decoding.greedy_decode(scripted_step, None, {}, state, max_len=3, go_id=GO, eos_id=PAD)
  with pytest.raises(ValueError, match="beam_width"):
    decoding.beam_search(
      scripted_step, None, {}, state, beam_width=0, max_len=3, go_id=GO, eos_id=EOS
    )
