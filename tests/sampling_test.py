"""Token sampling and generation, loss sampling for dense outputs, sampled softmax."""

import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from maskax.masking import sampling

V, D = 8, 6
PROMPT = np.array([[3, 1, 4, 1, 5], [2, 7, 0, 0, 0], [6, 5, 3, 0, 0]], np.int32)
LENGTHS = np.array([5, 2, 3], np.int32)
BANNED = np.isin(np.arange(V), [0, 3])


def toy_apply(params, tokens, lengths, carry):
  """A padded tanh RNN: carry frozen past each length, NaN logits at padded steps.

  tokens: i32[B, T]; lengths: i32[B]; carry: f32[B, D]. Returns (f32[B, T, V], f32[B, D]).
  """

  def step(h, token_and_t):
    token_B, t = token_and_t
    valid = (t < lengths)[:, None]
    h = jnp.where(valid, jnp.tanh(h @ params["rec"] + params["emb"][token_B]), h)
    return h, jnp.where(valid, h @ params["out"] + params["bias"][None, :], jnp.nan)

  carry, logits_TBV = jax.lax.scan(step, carry, (tokens.T, jnp.arange(tokens.shape[1])))
  return logits_TBV.transpose(1, 0, 2), carry


@pytest.fixture(scope="module")
def model():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
    "emb": jax.random.normal(k1, (V, D)),
    "rec": jax.random.normal(k2, (D, D)) * 0.6,
    "out": jax.random.normal(k3, (D, V)) * 1.5,
    "bias": jnp.zeros(V),
  }
  gen = jax.jit(sampling.generate, static_argnums=(0, 5), static_argnames=("top_k",))
  return params, functools.partial(gen, toy_apply, params)


def _zeros(batch):
  return jnp.zeros((batch, D))


OPTIONS = [dict(temperature=1.0), dict(temperature=0.7, top_k=4, banned=BANNED)]


@pytest.mark.parametrize("options", OPTIONS)
def test_chunked_generation_equals_one_call(model, options):
  _, gen = model
  key = jax.random.key(42)
  tokens, carry = gen(PROMPT, LENGTHS, _zeros(3), 9, key, **options)
  pieces, prompt, lengths, carry_c, start = [], PROMPT, LENGTHS, _zeros(3), 0
  for steps in (4, 1, 4):
    piece, carry_c = gen(prompt, lengths, carry_c, steps, key, start_step=start, **options)
    pieces.append(piece)
    prompt, lengths, start = piece[:, -1:], np.ones(3, np.int32), start + steps
  np.testing.assert_array_equal(np.concatenate(pieces, axis=1), tokens)
  np.testing.assert_allclose(carry_c, carry, rtol=1e-6, atol=1e-6)


def test_returned_carry_excludes_last_token(model):
  params, gen = model
  tokens, carry = gen(PROMPT, LENGTHS, _zeros(3), 5, jax.random.key(1))
  packed = np.zeros((3, PROMPT.shape[1] + 4), np.int32)  # each prompt, then tokens 1..4
  for b, length in enumerate(LENGTHS):
    packed[b, : length + 4] = np.concatenate([PROMPT[b, :length], tokens[b, :4]])
  _, want = toy_apply(params, packed, LENGTHS + 4, _zeros(3))
  np.testing.assert_allclose(carry, want, rtol=1e-5, atol=1e-6)


def test_ragged_prompts_greedy_equal_each_prompt_alone(model):
  _, gen = model
  tokens, _ = gen(PROMPT, LENGTHS, _zeros(3), 6, jax.random.key(0), temperature=0.0)
  for b, length in enumerate(LENGTHS):
    alone, _ = gen(
      PROMPT[b : b + 1, :length],
      LENGTHS[b : b + 1],
      _zeros(1),
      6,
      jax.random.key(0),
      temperature=0.0,
    )
    np.testing.assert_array_equal(alone[0], tokens[b])


def test_sampled_rows_ignore_padding_and_other_rows(model):
  _, gen = model
  key = jax.random.key(7)
  tokens, _ = gen(PROMPT, LENGTHS, _zeros(3), 8, key)
  garbage = np.concatenate([PROMPT, np.full((3, 3), 5, np.int32)], axis=1)
  garbage[1, 2:] = 6  # different ids in row 1's padding too
  padded, _ = gen(garbage, LENGTHS, _zeros(3), 8, key)
  np.testing.assert_array_equal(padded, tokens)
  others = PROMPT.copy()
  others[[0, 2]] = 2
  changed, _ = gen(others, np.array([1, 2, 4], np.int32), _zeros(3), 8, key)
  np.testing.assert_array_equal(changed[1], tokens[1])
  assert not np.array_equal(changed[0], tokens[0])


@pytest.mark.parametrize("options", OPTIONS)
def test_row_keys_make_a_rows_sample_independent_of_its_batch(model, options):
  # With one key per row, row b's tokens are the same alone, in the full batch, or in a batch
  # of different size; a single shared key ties each row's noise to the batch it is in.
  _, gen = model
  keys = sampling.row_keys(jax.random.key(3), 3)
  tokens, _ = gen(PROMPT, LENGTHS, _zeros(3), 10, keys, **options)
  for b, length in enumerate(LENGTHS):
    alone, _ = gen(
      PROMPT[b : b + 1, :length], LENGTHS[b : b + 1], _zeros(1), 10, keys[b : b + 1], **options
    )
    np.testing.assert_array_equal(alone[0], tokens[b])
  key = jax.random.key(3)
  shared, _ = gen(PROMPT, LENGTHS, _zeros(3), 10, key, **options)
  shared_alone = [
    gen(PROMPT[b : b + 1, :n], LENGTHS[b : b + 1], _zeros(1), 10, key, **options)[0][0]
    for b, n in enumerate(LENGTHS)
  ]
  # The shared-key draw depends on the batch: some row differs from its run alone.
  assert any(not np.array_equal(a, row) for a, row in zip(shared_alone, shared))
  with pytest.raises(ValueError, match="2 row keys for 3 rows"):
    sampling.sample_tokens(keys[:2], jnp.zeros((3, V)))


def test_same_key_same_tokens_jit_equals_eager(model):
  params, gen = model
  options = dict(temperature=1.5, top_k=3)
  run = lambda seed: gen(PROMPT, LENGTHS, _zeros(3), 12, jax.random.key(seed), **options)[0]
  eager, _ = sampling.generate(
    toy_apply, params, PROMPT, LENGTHS, _zeros(3), 12, jax.random.key(5), **options
  )
  np.testing.assert_array_equal(run(5), eager)
  np.testing.assert_array_equal(run(5), run(5))
  assert not np.array_equal(run(6), eager)


def test_banned_tokens_never_generated(model):
  _, gen = model
  free, _ = gen(PROMPT, LENGTHS, _zeros(3), 40, jax.random.key(3), temperature=3.0)
  assert np.isin(free, np.flatnonzero(BANNED)).any()  # they would appear without the ban
  tokens, _ = gen(PROMPT, LENGTHS, _zeros(3), 40, jax.random.key(3), temperature=3.0, banned=BANNED)
  assert not np.isin(tokens, np.flatnonzero(BANNED)).any()


def test_generate_rejects_bad_input(model):
  params, _ = model
  with pytest.raises(ValueError, match="prompt_lengths"):
    sampling.generate(
      toy_apply, params, PROMPT, np.array([5, 0, 3]), _zeros(3), 4, jax.random.key(0)
    )
  with pytest.raises(ValueError, match="steps"):
    sampling.generate(toy_apply, params, PROMPT, LENGTHS, _zeros(3), 0, jax.random.key(0))


LOGITS = jnp.array([[0.5, 2.0, -1.0, 1.5, 0.0, 1.0, -0.5, 3.0]])
TEMPERATURE = 2.0


def test_temperature_zero_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (4, V))
  got = sampling.sample_tokens(jax.random.key(1), logits, temperature=0.0)
  np.testing.assert_array_equal(got, jnp.argmax(logits, axis=-1))
  banned = np.arange(V) == 7  # the best token (3.0) banned: the next best (index 1, 2.0) wins
  got = sampling.sample_tokens(jax.random.key(1), LOGITS, temperature=0.0, banned=banned)
  assert int(got[0]) == 1


@pytest.fixture(scope="module")
def draw_many():
  keys = jax.random.split(jax.random.key(9), 4000)

  @functools.partial(jax.jit, static_argnames=("top_k",))
  def draw(banned, top_k):
    sample = lambda k: sampling.sample_tokens(
      k, LOGITS, temperature=TEMPERATURE, top_k=top_k, banned=banned
    )[0]
    return jax.vmap(sample)(keys)

  return draw


def test_top_k_restricts_support_and_keeps_tempered_softmax(draw_many):
  tokens = np.asarray(draw_many(np.zeros(V, bool), top_k=3))
  top3 = np.argsort(-np.asarray(LOGITS[0]))[:3]
  assert set(np.unique(tokens)) == set(top3)
  probs = np.exp(np.asarray(LOGITS[0], np.float64)[top3] / TEMPERATURE)
  probs /= probs.sum()
  freq = np.array([np.mean(tokens == k) for k in top3])
  tolerance = 4 * np.sqrt(probs * (1 - probs) / len(tokens))  # 4 sigma, binomial
  assert np.all(np.abs(freq - probs) < tolerance)


def test_top_k_with_banned_never_samples_banned(draw_many):
  banned = np.ones(V, bool)
  banned[[2, 4]] = False  # two allowed tokens, k = 5 > 2: top-k then holds -inf entries
  tokens = np.asarray(draw_many(banned, top_k=5))
  assert set(np.unique(tokens)) == {2, 4}


def test_sample_tokens_rejects_bad_options():
  with pytest.raises(ValueError, match="temperature"):
    sampling.sample_tokens(jax.random.key(0), LOGITS, temperature=-1.0)
  with pytest.raises(ValueError, match="every token"):
    sampling.sample_tokens(jax.random.key(0), LOGITS, banned=np.ones(V, bool))
  with pytest.raises(ValueError, match="banned"):
    sampling.sample_tokens(jax.random.key(0), LOGITS, banned=np.ones(V + 1, bool))


def _valid_cells():
  valid = np.asarray(jax.random.uniform(jax.random.key(0), (4, 16, 16))) < 0.7
  valid[2:] = False  # image 3: nothing valid; image 2: only 5 valid cells
  valid[2, 0, :5] = True
  return valid


def test_bernoulli_keep_rate_and_edges():
  valid = _valid_cells()
  keys = jax.random.split(jax.random.key(1), 64)
  keep = np.asarray(jax.jit(jax.vmap(sampling.bernoulli_keep, (0, None, None)))(keys, valid, 0.3))
  assert not keep[:, ~valid].any()
  n = len(keys) * valid.sum()
  assert abs(keep.sum() / n - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)  # 4 sigma, binomial
  np.testing.assert_array_equal(sampling.bernoulli_keep(keys[0], valid, 1.0), valid)
  assert not sampling.bernoulli_keep(keys[0], valid, 0.0).any()
  np.testing.assert_array_equal(sampling.bernoulli_keep(keys[0], valid, 0.3), keep[0])
  with pytest.raises(ValueError, match="p must be"):
    sampling.bernoulli_keep(keys[0], valid, 1.5)


def test_fixed_count_keep_is_uniform():
  valid = _valid_cells()
  keys = jax.random.split(jax.random.key(2), 400)
  keep = np.asarray(
    jax.jit(jax.vmap(sampling.fixed_count_keep, (0, None, None)), static_argnums=2)(keys, valid, 12)
  )
  # Every valid cell of image 0 is kept with probability 12 / #valid (4.5 sigma: ~180 cells).
  p = 12 / valid[0].sum()
  freq = keep[:, 0][:, valid[0]].mean(0)
  assert np.all(np.abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / len(keys)))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.booleans(), min_size=32, max_size=32), st.integers(0, 20), st.integers(0, 99))
def test_fixed_count_keep_exact_count(flags, count, seed):
  valid = np.reshape(flags, (2, 4, 4))
  keep = np.asarray(sampling.fixed_count_keep(jax.random.key(seed), valid, count))
  assert not keep[~valid].any()
  np.testing.assert_array_equal(keep.sum((1, 2)), np.minimum(count, valid.sum((1, 2))))


def test_class_rebalanced_keep_rates_per_class():
  valid = _valid_cells()
  labels = np.asarray(jax.random.randint(jax.random.key(3), valid.shape, 0, 3))
  labels = np.where(valid, labels, 255)
  probs = np.array([0.1, 1.0, 0.5], np.float32)  # class 0 is background
  keys = jax.random.split(jax.random.key(4), 64)
  keep = np.asarray(
    jax.jit(jax.vmap(sampling.class_rebalanced_keep, (0, None, None, None)))(
      keys, labels, valid, probs
    )
  )
  assert not keep[:, ~valid].any()
  for c, p in enumerate(probs):
    cells = valid & (labels == c)
    rate = keep[:, cells].mean()
    n = len(keys) * cells.sum()
    assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n)
  with pytest.raises(ValueError, match="labels at valid cells"):
    sampling.class_rebalanced_keep(keys[0], np.where(valid, 3, 0), valid, probs)


def _zipf(v):
  k = np.arange(v, dtype=np.float64)
  return (np.log(k + 2) - np.log(k + 1)) / np.log(v + 1)


def test_log_uniform_frequencies_match_zipf():
  n, v = 100_000, 16
  cand = jax.jit(sampling.log_uniform_candidates, static_argnums=(1, 2))(jax.random.key(0), n, v)
  p = _zipf(v)
  freq = np.bincount(np.asarray(cand.ids), minlength=v) / n
  assert freq.shape == (v,)
  assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n))  # 4 sigma per class
  np.testing.assert_allclose(np.exp(cand.log_q(jnp.arange(v))), n * p, rtol=1e-4)


def test_unique_log_uniform_matches_exact_enumeration():
  """Inclusion probabilities and mean expected counts against an exact reference.

  It enumerates every ordered draw of S distinct ids (first appearances when sampling with
  replacement, as TF's unique sampler) and the draws n each needs (a sum of geometric waits),
  giving P(k included) and E[1 - (1 - P(k))^n] exactly.
  """
  v, s, k_runs = 6, 3, 20_000
  p = _zipf(v)
  incl, mean_q = np.zeros(v), np.zeros(v)
  for order in itertools.permutations(range(v), s):
    left = 1 - np.concatenate([[0.0], np.cumsum(p[list(order)])[:-1]])
    prob = np.prod(p[list(order)] / left)
    incl[list(order)] += prob
    z = 1 - p  # E[z^n] = product of geometric generating functions s z / (1 - (1 - s) z)
    mean_q += prob * (1 - np.prod(left[:, None] * z / (1 - (1 - left[:, None]) * z), axis=0))

  def one(key):
    cand = sampling.log_uniform_candidates(key, s, v, unique=True)
    return cand.ids, jnp.exp(cand.log_q(jnp.arange(v)))

  ids, q = map(np.asarray, jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), k_runs)))
  assert np.all(np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1])  # distinct
  got_incl = np.stack([(ids == k).any(1) for k in range(v)], 1).mean(0)
  assert np.all(np.abs(got_incl - incl) < 4 * np.sqrt(incl * (1 - incl) / k_runs))
  assert np.all(np.abs(q.mean(0) - mean_q) < 4 * q.std(0) / np.sqrt(k_runs))


VOCAB, HID, N = 32, 8, 4


@pytest.fixture(scope="module")
def softmax_problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  w = jax.random.normal(k1, (VOCAB, HID)) * 0.3
  # Biases at the Zipf log-probabilities: classes sorted by frequency, as the sampler assumes.
  b = jnp.log(jnp.asarray(_zipf(VOCAB), jnp.float32)) + 0.1 * jax.random.normal(k2, (VOCAB,))
  h = jax.random.normal(k3, (N, HID))
  labels = jax.random.categorical(k4, h @ w.T + b[None, :]).astype(jnp.int32)
  return h, w, b, labels


def _full_xent(h, w, b, labels):
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(h @ w.T + b[None, :], labels))


def test_all_classes_with_certain_candidates_equals_full_softmax(softmax_problem):
  h, w, b, labels = softmax_problem
  mask = jnp.ones(N, bool)
  # Every class is a candidate with certainty: expected count 1, log Q = 0, so the correction
  # vanishes and removing the label's sampled copy leaves exactly the full softmax.
  cand = types.SimpleNamespace(
    ids=jax.random.permutation(jax.random.key(0), VOCAB), log_q=lambda k: jnp.zeros(k.shape)
  )
  loss = jax.jit(
    lambda h, w, b: sampling.sampled_softmax_loss(h, w, b, labels, mask, candidates=cand)[0]
  )
  np.testing.assert_allclose(loss(h, w, b), _full_xent(h, w, b, labels), rtol=1e-5)
  grads = jax.jit(jax.grad(loss, (0, 1, 2)))(h, w, b)
  want = jax.grad(_full_xent, (0, 1, 2))(h, w, b, labels)
  for g, g_full in zip(grads, want):
    np.testing.assert_allclose(g, g_full, rtol=1e-4, atol=1e-6)
  # Without hit removal the label is counted twice in the partition function.
  twice, _ = sampling.sampled_softmax_loss(
    h, w, b, labels, mask, candidates=cand, remove_accidental_hits=False
  )
  z = np.asarray(h @ w.T + b[None, :], np.float64)
  zy = z[np.arange(N), np.asarray(labels)]
  want = np.sum(np.log(np.exp(z).sum(1) + np.exp(zy)) - zy)
  np.testing.assert_allclose(twice, want, rtol=1e-5)


def test_sampler_with_all_classes_is_full_softmax_of_corrected_logits(softmax_problem):
  h, w, b, labels = softmax_problem
  key = jax.random.key(3)
  cand = sampling.log_uniform_candidates(key, VOCAB, VOCAB, unique=True)
  assert sorted(np.asarray(cand.ids).tolist()) == list(range(VOCAB))
  total, weight = sampling.sampled_softmax_loss(
    h, w, b, labels, jnp.ones(N, bool), key=key, num_sampled=VOCAB
  )
  # The unique sampler's expected counts are below 1 for rare classes, so log Q still shifts
  # the logits: the exact equivalent is the full softmax over z - log Q.
  z = np.asarray(h @ w.T + b[None, :], np.float64) - np.asarray(cand.log_q(jnp.arange(VOCAB)))[None]
  zy = z[np.arange(N), np.asarray(labels)]
  np.testing.assert_allclose(total, np.sum(np.log(np.exp(z).sum(1)) - zy), rtol=1e-5)
  assert weight == N


def test_expected_sampled_gradient_approaches_full_gradient(softmax_problem):
  """Mean gradient over 1000 keys vs the full gradient (max relative L2 error over h, W, b).

  Sampled softmax is biased for finite S (self-normalised importance sampling); the bias
  shrinks as S grows, and the log Q correction is what makes it small. Measured here (equal
  to 0.003 at 8000 keys): S=16 of V=32 0.038 with the correction, 0.13 without; S=4 0.27.
  """
  h, w, b, labels = softmax_problem
  mask = jnp.ones(N, bool)
  keys = jax.random.split(jax.random.key(0), 1000)
  full = jax.grad(_full_xent, (0, 1, 2))(h, w, b, labels)

  def rel_error(num_sampled, subtract_log_q):
    def grad(key):
      loss = lambda h, w, b: sampling.sampled_softmax_loss(
        h, w, b, labels, mask, key=key, num_sampled=num_sampled, subtract_log_q=subtract_log_q
      )[0]
      return jax.grad(loss, (0, 1, 2))(h, w, b)

    mean = jax.tree.map(lambda g: g.mean(0), jax.jit(jax.vmap(grad))(keys))
    return max(float(jnp.linalg.norm(m - f) / jnp.linalg.norm(f)) for m, f in zip(mean, full))

  big = rel_error(16, True)
  assert big < 0.06
  assert rel_error(16, False) > 2 * big
  assert rel_error(4, True) > 2 * big


def test_sampled_softmax_masked_rows_and_nan_do_not_leak(softmax_problem):
  h, w, b, labels = softmax_problem
  mask = jnp.array([True, False, True, False])
  bad_h = jnp.where(mask[:, None], h, jnp.nan)
  bad_labels = jnp.where(mask, labels, jnp.array([0, -7, 0, 10**6]))
  loss = jax.jit(
    lambda h, w, b, labels, mask: sampling.sampled_softmax_loss(
      h, w, b, labels, mask, key=jax.random.key(5), num_sampled=8
    )
  )
  total, weight = loss(bad_h, w, b, bad_labels, mask)
  kept = np.flatnonzero(mask)
  want_total, want_weight = loss(h[kept], w, b, labels[kept], jnp.ones(2, bool))
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  assert weight == want_weight == 2
  g_h, g_w = jax.grad(lambda h, w: loss(h, w, b, bad_labels, mask)[0], (0, 1))(bad_h, w)
  want_w = jax.grad(lambda w: loss(h[kept], w, b, labels[kept], jnp.ones(2, bool))[0])(w)
  assert np.all(np.isfinite(g_h)) and np.all(np.asarray(g_h)[~np.asarray(mask)] == 0)
  np.testing.assert_allclose(g_w, want_w, rtol=1e-5, atol=1e-7)
  empty = jnp.zeros(N, bool)
  assert loss(bad_h, w, b, bad_labels, empty) == (0, 0)
  g = jax.grad(lambda h, w: loss(h, w, b, bad_labels, empty)[0], (0, 1))(bad_h, w)
  assert all(np.all(np.asarray(x) == 0) for x in g)


def test_sampled_softmax_rejects_bad_input(softmax_problem):
  h, w, b, labels = softmax_problem
  with pytest.raises(ValueError, match="labels at valid rows"):
    sampling.sampled_softmax_loss(
      h, w, b, labels.at[0].set(VOCAB), jnp.ones(N, bool), key=jax.random.key(0), num_sampled=4
    )
  with pytest.raises(ValueError, match="num_sampled <= range_max"):
    sampling.sampled_softmax_loss(
      h, w, b, labels, jnp.ones(N, bool), key=jax.random.key(0), num_sampled=VOCAB + 1
    )
