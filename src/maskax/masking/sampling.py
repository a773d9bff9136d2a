"""Sampling: tokens for generation, loss terms for dense outputs, candidates for sampled softmax.

Every sampler takes an explicit `key`; generation derives the key of step i as
`fold_in(key, start_step + i)`, so generating in chunks gives the same tokens as one call.
Token sampling also takes one key per row (`row_keys`): a row's tokens then depend only on its
own logits and key, not on which other rows share its batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


def sample_tokens(key, logits, *, temperature=1.0, top_k: int = 0, banned=None):
  """Draws one token per row: temperature, then top-k, never a banned token.

  logits: f32[B, V]; banned: bool[V] or None (True = never sample). Returns i32[B].
  `temperature=0` is greedy argmax (a traced temperature works too). `top_k=0` keeps all V.
  Banned tokens get -inf through `jnp.where` before top-k, so when fewer than k tokens are
  allowed the -inf ones are still never drawn. `key`: one key, from which the rows draw
  independent noise (so a row's draw depends on the batch it is in), or key[B] (`row_keys`),
  one per row (a row's draw depends on its key alone).
  """
  logits = jnp.asarray(logits, jnp.float32)
  _check(logits.ndim == 2, f"logits must be f32[B, V], got shape {logits.shape}.")
  per_row = _is_row_keys(key)
  if per_row:
    _check(
      key.shape[0] == logits.shape[0],
      f"key holds {key.shape[0]} row keys for {logits.shape[0]} rows of logits; pass one"
      " key or row_keys(key, B).",
    )
  vocab = logits.shape[1]
  _check(
    isinstance(top_k, int) and top_k >= 0,
    f"top_k must be a static int >= 0 (0 = no top-k), got {top_k!r}.",
  )
  if _is_concrete(temperature):
    _check(float(temperature) >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}.")
  if banned is not None:
    banned = jnp.asarray(banned)
    _check(
      banned.dtype == jnp.bool_ and banned.shape == (vocab,),
      f"banned must be bool[V={vocab}], got {banned.dtype}{list(banned.shape)}.",
    )
    if _is_concrete(banned):
      _check(not bool(np.all(banned)), "banned bans every token; leave at least one allowed.")
    logits = jnp.where(banned[None, :], -jnp.inf, logits)
  ids = None
  if 0 < top_k < vocab:
    # Sampling among the k gathered logits gives exactly k candidates even with ties.
    logits, ids = jax.lax.top_k(logits, top_k)
  t = jnp.asarray(temperature, jnp.float32)
  scaled = logits / jnp.where(t > 0, t, 1.0)
  if per_row:
    sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, scaled)
  else:
    sampled = jax.random.categorical(key, scaled, axis=-1)
  choice = jnp.where(t > 0, sampled, jnp.argmax(logits, axis=-1))
  if ids is not None:
    choice = jnp.take_along_axis(ids, choice[:, None], axis=1)[:, 0]
  return choice.astype(jnp.int32)


def row_keys(key, batch: int):
  """One key per row, fold_in(key, b): row b's key does not depend on the batch size. -> key[B]."""
  return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def _is_row_keys(key) -> bool:
  """key[B] (typed) or u32[B, 2] (raw): one key per row, rather than one key for all."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2


def _fold(key, i):
  """fold_in(key, i) for one key or for each of a batch of row keys."""
  if _is_row_keys(key):
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(key)
  return jax.random.fold_in(key, i)


def generate(
  apply_fn: Callable,
  params,
  prompt,
  prompt_lengths,
  carry,
  steps: int,
  key,
  *,
  temperature=1.0,
  top_k: int = 0,
  banned=None,
  start_step=0,
):
  """Runs a ragged prompt batch through a recurrent model, then samples `steps` tokens.

  apply_fn(params, tokens i32[B, T], lengths i32[B], carry) -> (logits f32[B, T, V], carry)
  runs a padded recurrent model whose carry is frozen past each row's length.
  prompt: i32[B, T]; prompt_lengths: i32[B], each in [1, T]. Returns (tokens i32[B, steps],
  carry). Token 1 comes from the logits at each row's last valid prompt position; a
  `lax.scan` then feeds each token back (length 1) to sample the next. The returned carry has
  consumed the prompt and tokens 1..steps-1 but not the last token, so
  `generate(apply_fn, params, tokens[:, -1:], ones, carry, n, key, start_step=steps)`
  continues exactly where one longer call would. `key` is one key, or one per row (`row_keys`)
  to make each row's text independent of its batch. Jit with `apply_fn`, `steps`, `top_k` static.
  """
  prompt = jnp.asarray(prompt)
  lengths = jnp.asarray(prompt_lengths)
  _check(
    prompt.ndim == 2 and jnp.issubdtype(prompt.dtype, jnp.integer),
    f"prompt must be i32[B, T], got {prompt.dtype}{list(prompt.shape)}.",
  )
  batch, time = prompt.shape
  _check(
    lengths.shape == (batch,) and jnp.issubdtype(lengths.dtype, jnp.integer),
    f"prompt_lengths must be i32[B={batch}], got {lengths.dtype}{list(lengths.shape)}.",
  )
  _check(
    isinstance(steps, int) and steps >= 1,
    f"steps must be a static int >= 1, got {steps!r} (mark it static under jit).",
  )
  if _is_concrete(lengths):
    _check(
      bool(np.all((np.asarray(lengths) >= 1) & (np.asarray(lengths) <= time))),
      f"prompt_lengths must lie in [1, T={time}] (a row needs a token to start from), got"
      f" {np.asarray(lengths).tolist()}; give an empty prompt a start token.",
    )
  sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, banned=banned)

  logits_BTV, carry = apply_fn(params, prompt, lengths, carry)
  last_BV = logits_BTV[jnp.arange(batch), jnp.clip(lengths - 1, 0, time - 1)]
  first = sample(_fold(key, start_step), last_BV)
  ones = jnp.ones((batch,), lengths.dtype)

  def step(state, i):
    carry, token = state
    logits_B1V, carry = apply_fn(params, token[:, None], ones, carry)
    following = sample(_fold(key, start_step + i), logits_B1V[:, 0])
    return (carry, following), token

  (carry, last), fed_SB = jax.lax.scan(step, (carry, first), jnp.arange(1, steps))
  return jnp.concatenate([fed_SB.T, last[:, None]], axis=1), carry


def bernoulli_keep(key, valid, p):
  """Keeps each valid cell's loss term with probability p (FCN loss sampling, Long et al. 2015).

  valid: bool[B, H, W]; p: float in [0, 1]. Returns bool[B, H, W]. p = 1 keeps exactly the
  valid cells, invalid cells are never kept. §3.4: patchwise training is loss sampling.
  """
  valid = jnp.asarray(valid)
  _check(valid.dtype == jnp.bool_, f"valid must be a bool mask, got {valid.dtype}.")
  if _is_concrete(p):
    _check(0.0 <= float(p) <= 1.0, f"p must be a keep probability in [0, 1], got {p}.")
  # uniform is in [0, 1), so `u < 1` always holds and p = 1 reproduces the full loss exactly.
  return valid & (jax.random.uniform(key, valid.shape) < p)


def fixed_count_keep(key, valid, count: int):
  """Keeps exactly min(count, #valid) valid cells per image, uniformly at random.

  valid: bool[B, H, W]; count: static int >= 0. Returns bool[B, H, W]. Static shapes: the
  top `count` of uniform scores, with invalid cells scored below every valid one.
  """
  valid = jnp.asarray(valid)
  _check(
    valid.dtype == jnp.bool_ and valid.ndim >= 2,
    f"valid must be bool[B, H, W], got {valid.dtype}{list(valid.shape)}.",
  )
  _check(isinstance(count, int) and count >= 0, f"count must be a static int >= 0, got {count!r}.")
  flat = valid.reshape(valid.shape[0], -1)
  count = min(count, flat.shape[1])
  if count == 0:
    return jnp.zeros_like(valid)
  scores = jnp.where(flat, jax.random.uniform(key, flat.shape), -1.0)
  top, idx = jax.lax.top_k(scores, count)
  # Scatter by index, not `scores >= threshold`: equal float32 draws would keep too many.
  rows = jnp.broadcast_to(jnp.arange(flat.shape[0])[:, None], idx.shape)
  keep = jnp.zeros_like(flat).at[rows, idx].set(top >= 0.0)
  return keep.reshape(valid.shape)


def class_rebalanced_keep(key, labels, valid, keep_prob_per_class):
  """Keeps each valid cell with the probability of its class (sample background less often).

  labels: i32[B, H, W] (anything at invalid cells, e.g. 255); valid: bool[B, H, W];
  keep_prob_per_class: f32[C]. Returns bool[B, H, W].
  """
  labels = jnp.asarray(labels)
  valid = jnp.asarray(valid)
  probs = jnp.asarray(keep_prob_per_class, jnp.float32)
  _check(
    valid.dtype == jnp.bool_ and labels.shape == valid.shape,
    f"labels {list(labels.shape)} and bool valid {valid.dtype}{list(valid.shape)} must match.",
  )
  _check(probs.ndim == 1, f"keep_prob_per_class must be f32[C], got shape {probs.shape}.")
  num_classes = probs.shape[0]
  if _is_concrete(labels) and _is_concrete(valid):
    lab, val = np.asarray(labels), np.asarray(valid)
    _check(
      bool(np.all((lab[val] >= 0) & (lab[val] < num_classes))),
      f"labels at valid cells must lie in [0, C={num_classes}); mark ignored cells invalid.",
    )
  p = jnp.take(probs, jnp.where(valid, labels, 0), mode="clip")
  return valid & (jax.random.uniform(key, valid.shape) < p)


def _log_uniform_log_prob(ids, range_max: int):
  """log P(k) for the Zipfian P(k) = (log(k+2) - log(k+1)) / log(range_max+1); ids: i32[...]."""
  k = ids.astype(jnp.float32)
  return jnp.log(jnp.log1p(1.0 / (k + 1.0))) - jnp.log(jnp.log(range_max + 1.0))


@struct.dataclass
class Candidates:
  """Candidate classes of one sampled-softmax step and their expected counts.

  ids: i32[S]; num_tries: f32[], the draws with replacement that produced ids (S when not
  unique). A pytree, so it can leave a jitted function.
  """

  ids: jax.Array
  num_tries: jax.Array
  range_max: int = struct.field(pytree_node=False)
  unique: bool = struct.field(pytree_node=False)

  def log_q(self, k):
    """Log expected count of class k in this draw (TF's expected_count); k: i32[...] -> f32[...].

    S * P(k) with replacement; 1 - (1 - P(k))^num_tries for unique draws.
    """
    log_p = _log_uniform_log_prob(k, self.range_max)
    if not self.unique:
      return jnp.log(self.num_tries) + log_p
    return jnp.log(-jnp.expm1(self.num_tries * jnp.log1p(-jnp.exp(log_p))))


def log_uniform_candidates(key, num_sampled: int, range_max: int, *, unique: bool = False):
  """Draws candidate classes from the log-uniform (Zipfian) distribution over [0, range_max).

  Returns a `Candidates` with ids i32[S] and `log_q(k)`, as TF's log_uniform_candidate_sampler.
  With `unique=True` the S ids are distinct: TF draws with replacement until it has seen S
  ids and counts the draws n. Here the ids come from Gumbel-top-S (the same distribution as
  the order of first appearances) and n from S geometric waiting times, so the static-shape
  sampler has TF's distribution without its data-dependent loop.
  """
  _check(
    isinstance(range_max, int) and range_max >= 1,
    f"range_max must be an int >= 1, got {range_max!r}.",
  )
  _check(
    isinstance(num_sampled, int) and num_sampled >= 1,
    f"num_sampled must be a static int >= 1, got {num_sampled!r}.",
  )
  if not unique:
    u = jax.random.uniform(key, (num_sampled,))
    ids = jnp.floor(jnp.exp(u * jnp.log(range_max + 1.0))) - 1.0  # inverse CDF of P(k)
    ids = jnp.clip(ids, 0, range_max - 1).astype(jnp.int32)
    return Candidates(ids, jnp.float32(num_sampled), range_max, False)

  _check(
    num_sampled <= range_max,
    f"unique sampling needs num_sampled <= range_max, got {num_sampled} > {range_max}.",
  )
  order_key, tries_key = jax.random.split(key)
  log_p = _log_uniform_log_prob(jnp.arange(range_max), range_max)
  _, ids = jax.lax.top_k(log_p + jax.random.gumbel(order_key, (range_max,)), num_sampled)
  # Before the j-th new id appears, the ids not yet seen hold mass left_j; waiting for it takes
  # Geometric(left_j) draws. Sums of positive terms avoid the cancellation of 1 - cumsum.
  p_chosen = jnp.exp(log_p[ids])
  unchosen = jnp.sum(jnp.where(jnp.zeros(range_max, bool).at[ids].set(True), 0.0, jnp.exp(log_p)))
  left = jnp.cumsum(p_chosen[::-1])[::-1] + unchosen
  tries = jnp.sum(jax.random.geometric(tries_key, jnp.clip(left, 1e-30, 1.0)))
  return Candidates(ids.astype(jnp.int32), tries.astype(jnp.float32), range_max, True)


def sampled_softmax_loss(
  hidden,
  weights,
  biases,
  labels,
  mask,
  *,
  key=None,
  num_sampled: int = 0,
  remove_accidental_hits: bool = True,
  unique: bool = True,
  subtract_log_q: bool = True,
  candidates=None,
):
  """Sampled softmax cross-entropy (Jean et al. 2015; tf.nn.sampled_softmax_loss), training only.

  hidden: f32[N, D]; weights: f32[V, D]; biases: f32[V]; labels: i32[N]; mask: bool[N].
  Returns (total, weight): f32[] sum over valid rows and their count, for a token mean.
  Each row's logits are its true class and S candidates shared by the batch, drawn with `key`
  by `log_uniform_candidates(key, num_sampled, V, unique=unique)` (class ids must be sorted
  by frequency) or given as `candidates` (any object with `ids` i32[S] and `log_q(k)`). Every
  logit has its log expected count subtracted (the log Q correction), and a candidate equal to
  the row's label is removed. With all V classes as candidates and log_q = 0 (each class
  certainly drawn) this is the full softmax cross-entropy exactly. Evaluation and reported
  perplexity always use the full softmax: this loss is a biased, cheaper estimate for training.
  """
  hidden, weights, biases = (jnp.asarray(a) for a in (hidden, weights, biases))
  labels, mask = jnp.asarray(labels), jnp.asarray(mask)
  _check(
    hidden.ndim == 2 and weights.ndim == 2 and hidden.shape[1] == weights.shape[1],
    f"hidden f32[N, D] and weights f32[V, D] must share D, got {hidden.shape} and {weights.shape}.",
  )
  vocab = weights.shape[0]
  _check(biases.shape == (vocab,), f"biases must be f32[V={vocab}], got {biases.shape}.")
  _check(
    labels.shape == hidden.shape[:1] and jnp.issubdtype(labels.dtype, jnp.integer),
    f"labels must be i32[N={hidden.shape[0]}], got {labels.dtype}{list(labels.shape)}.",
  )
  _check(
    mask.shape == labels.shape and mask.dtype == jnp.bool_,
    f"mask must be bool[N={hidden.shape[0]}], got {mask.dtype}{list(mask.shape)}.",
  )
  if _is_concrete(labels) and _is_concrete(mask):
    lab = np.asarray(labels)[np.asarray(mask)]
    _check(
      bool(np.all((lab >= 0) & (lab < vocab))),
      f"labels at valid rows must lie in [0, V={vocab}); mark other rows False in mask.",
    )
  if candidates is None:
    _check(key is not None, "sampled_softmax_loss needs `key` (or explicit `candidates`).")
    candidates = log_uniform_candidates(key, num_sampled, vocab, unique=unique)
  ids, log_q = candidates.ids, candidates.log_q

  m = mask[:, None]
  h_ND = jnp.where(m, hidden, 0.0)  # NaN in padded rows must not reach the shared candidates' grads
  y = jnp.where(mask, labels, 0)
  true_N = jnp.sum(h_ND * weights[y], axis=-1) + biases[y]
  sampled_NS = h_ND @ weights[ids].T + biases[ids][None, :]
  if subtract_log_q:
    true_N = true_N - log_q(y)
    sampled_NS = sampled_NS - log_q(ids)[None, :]
  if remove_accidental_hits:
    # A finite -max rather than -inf: logsumexp stays finite and where cuts the gradient.
    hit = ids[None, :] == y[:, None]
    sampled_NS = jnp.where(hit, jnp.finfo(sampled_NS.dtype).min, sampled_NS)
  logits = jnp.concatenate([true_N[:, None], sampled_NS], axis=1)
  loss_N = jax.nn.logsumexp(logits, axis=1) - true_N
  total = jnp.sum(jnp.where(mask, loss_N, 0.0))
  return total, jnp.sum(mask, dtype=jnp.float32)
