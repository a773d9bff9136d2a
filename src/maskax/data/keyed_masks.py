"""MLM masks keyed by what they mask, for a loader that builds each process's rows alone.

`bert_data.mask_static` draws from one sequential generator per call, so a row's mask depends on
the rows masked with it. A streaming loader builds only this process's rows of each batch, in
any order after a resume, so here every random number is a hash of (row key, column): a row's
mask is a pure function of its key (static: seed, dupe, document, instance; dynamic: seed and
the row's place in the global batch). The hash is SplitMix64's finaliser (Steele et al. 2014),
a bijection on 64 bits with full avalanche; tests check the shares it gives. The rules are
bert_data's own, through its helpers: google-research/bert's count, candidates, whole words and
80/10/10 for static masks, HF's collator for dynamic ones.
Letters: N rows, T = seq_len, P = max predictions, V vocab.
"""

from __future__ import annotations

import numpy as np

from maskax.data import bert_data

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))
# Salts separate the streams one key feeds (`uniforms(key, m, salt)`).
SELECT, KIND, RANDOM_ID, KEEP = 1, 2, 3, 4


def mix(x: np.ndarray) -> np.ndarray:
  """u64[...] -> u64[...]: splitmix64's finaliser (wrapping arithmetic)."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
  return x ^ (x >> _S31)


def row_keys(*parts) -> np.ndarray:
  """u64[N]: one key per row from non-negative int parts (scalars or i[N], broadcast)."""
  key = np.zeros(np.broadcast_shapes(*(np.shape(p) for p in parts)), np.uint64)
  with np.errstate(over="ignore"):
    for i, part in enumerate(parts, 1):  # The position salt makes (a, b) and (b, a) differ.
      key = mix(key ^ (np.asarray(part).astype(np.uint64) + _GOLDEN * np.uint64(i)))
  return key


def uniforms(keys: np.ndarray, m: int, salt: int) -> np.ndarray:
  """f64[N, m] in [0, 1): column j of row n is a hash of (keys[n], salt, j), 53 bits."""
  with np.errstate(over="ignore"):
    column = mix(np.arange(m, dtype=np.uint64) + np.uint64(salt << 32))
    bits = mix(keys[:, None] ^ column[None, :]) >> _S11
  return bits.astype(np.float64) * 2.0**-53


def integers(keys: np.ndarray, m: int, salt: int, high: int) -> np.ndarray:
  """i64[N, m] uniform in [0, high) (bias below high / 2**53)."""
  return np.minimum(uniforms(keys, m, salt) * high, high - 1).astype(np.int64)


class _Drawn:
  """Stands in for the generator of `bert_data._whole_word_choice`: hands it our uniforms."""

  def __init__(self, u: np.ndarray):
    self._u = u

  def random(self, shape) -> np.ndarray:
    assert tuple(shape) == self._u.shape, (shape, self._u.shape)
    return self._u


def mask_static(
  tokens: np.ndarray,
  lengths: np.ndarray,
  keys: np.ndarray,
  tokenizer,
  *,
  max_predictions: int,
  masked_lm_prob: float,
  whole_word: bool = False,
  subword_flags: np.ndarray | None = None,
) -> dict:
  """`bert_data.mask_static`'s rules with each row's random numbers from its key.

  tokens: i32[N, T]; lengths: i32[N]; keys: u64[N]. Returns input_ids i32[N, T],
  masked_lm_positions i32[N, P], masked_lm_ids i32[N, P], masked_lm_weights f32[N, P].
  `subword_flags` (bool[V], `tokenizer.subword_flags()`) may be passed to skip a copy per call.
  """
  t, p = tokens.shape[1], max_predictions
  maskable = bert_data.maskable_positions(tokens, lengths, (tokenizer.cls_id, tokenizer.sep_id))
  counts = np.array(
    [bert_data.num_to_mask(int(length), masked_lm_prob, p) for length in lengths], np.int64
  )
  u = uniforms(keys, t, SELECT)
  if whole_word:
    flags = tokenizer.subword_flags() if subword_flags is None else subword_flags
    previous_maskable = np.pad(maskable[:, :-1], ((0, 0), (1, 0)))
    continues = maskable & previous_maskable & flags[tokens]
    order, used = bert_data._whole_word_choice(maskable, continues, counts, p, _Drawn(u))
  else:
    # A uniformly random subset of size count: the first `count` of a random order.
    order = np.argsort(np.where(maskable, u, 2.0), axis=1, kind="stable")[:, :p]
    used = (np.arange(p)[None, :] < counts[:, None]) & np.take_along_axis(maskable, order, 1)
  return bert_data._gather_selected(
    order,
    used,
    tokens,
    uniforms(keys, p, KIND),
    integers(keys, p, RANDOM_ID, tokenizer.vocab_size),
    tokenizer.mask_id,
  )


def dynamic_draws(keys: np.ndarray, seq_len: int, max_predictions: int, vocab_size: int) -> dict:
  """`bert_data.dynamic_draws` for rows keyed by `keys` (u64[N]), for `bert_data.mask_dynamic`.

  Returns select_u f64[N, T], keep_u f64[N, T], kind_u f64[N, P], random_ids i64[N, P].
  """
  return dict(
    select_u=uniforms(keys, seq_len, SELECT),
    keep_u=uniforms(keys, seq_len, KEEP),
    kind_u=uniforms(keys, max_predictions, KIND),
    random_ids=integers(keys, max_predictions, RANDOM_ID, vocab_size),
  )
