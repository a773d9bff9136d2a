"""BERT pretraining examples: NSP sentence pairs, static and dynamic MLM masking.

Pairs follow google-research/bert `create_pretraining_data.py` (Devlin et al. 2019, App. A.1);
static masking follows the same script, dynamic masking HF's `DataCollatorForLanguageModeling`
(RoBERTa, Liu et al. 2019, §4.1). Everything is NumPy on the host, randomness from an explicit
`np.random.Generator`. Letters: N instances, B batch, T = seq_len, P = max predictions, V vocab.

The MLM output is *gathered*: `masked_lm_positions/ids/weights` of length P per sequence, sorted
by position; unused slots hold position 0, id 0, weight 0 (position 0 is [CLS], never masked).
The 10% "random token" is uniform over all V ids, special tokens included, as in both references.
"""

import dataclasses

import numpy as np

from maskax.data.tokenizer import WordPieceTokenizer

MASK_PROB, RANDOM_PROB = 0.8, 0.1  # Of the selected tokens; the remaining 10% keep their id.
IS_NEXT, IS_RANDOM = 0, 1  # next_sentence_labels, as in google-research/bert.


@dataclasses.dataclass(frozen=True)
class Instances:
  """NSP instances before MLM masking: `[CLS] A [SEP] B [SEP]`, right-padded with id 0.

  tokens: i32[N, T]; segment_ids: i32[N, T] (0 for [CLS] A [SEP], 1 for B [SEP], 0 at pads);
  lengths: i32[N] real tokens per row; next_sentence_labels: i32[N] (0 IsNext, 1 random B).
  """

  tokens: np.ndarray
  segment_ids: np.ndarray
  lengths: np.ndarray
  next_sentence_labels: np.ndarray

  @property
  def input_mask(self) -> np.ndarray:
    """bool[N, T]: True at real tokens."""
    return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def tokenize_documents(
  documents: list[list[str]], tokenizer: WordPieceTokenizer
) -> list[list[list[int]]]:
  """Token ids per sentence per document, in one batched call; empties dropped."""
  flat = [s for doc in documents for s in doc]
  ids = iter(tokenizer.encode_batch(flat))
  docs = [[s for s in (next(ids) for _ in doc) if s] for doc in documents]
  return [d for d in docs if d]


def _truncate_pair(
  a: list[int], b: list[int], max_num_tokens: int, rng
) -> tuple[list[int], list[int]]:
  """Trims the longer segment one token at a time, from its front or back with equal odds."""
  excess = len(a) + len(b) - max_num_tokens
  if excess <= 0:
    return a, b
  from_front = rng.random(excess) < 0.5  # Random ends avoid a bias toward sentence starts.
  a_lo, a_hi, b_lo, b_hi = 0, len(a), 0, len(b)
  for front in from_front:
    if a_hi - a_lo > b_hi - b_lo:
      a_lo, a_hi = (a_lo + 1, a_hi) if front else (a_lo, a_hi - 1)
    else:
      b_lo, b_hi = (b_lo + 1, b_hi) if front else (b_lo, b_hi - 1)
  return a[a_lo:a_hi], b[b_lo:b_hi]


def _random_span(docs, skip: int, target: int, rng) -> list[int]:
  """Sentences from a random start in a document other than `skip`, until `target` tokens."""
  other = int(rng.integers(len(docs) - 1))
  other += other >= skip  # Uniform over the other documents (the reference retries 10 times).
  doc = docs[other]
  span = []
  for sentence in doc[int(rng.integers(len(doc))) :]:
    span.extend(sentence)
    if len(span) >= target:
      break
  return span


def _document_pairs(
  docs, d: int, max_num_tokens: int, short_seq_prob: float, rng, out: list
) -> None:
  """Appends (A, B, label) pairs of document `d` to `out`, walking its sentences in chunks."""
  doc = docs[d]
  # Short targets now and then, so that the model also sees short sequences (BERT App. A.2).
  target = max_num_tokens
  if rng.random() < short_seq_prob:
    target = int(rng.integers(2, max_num_tokens + 1))
  chunk, chunk_len, i = [], 0, 0
  while i < len(doc):
    chunk.append(doc[i])
    chunk_len += len(doc[i])
    if i == len(doc) - 1 or chunk_len >= target:
      a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
      a = [t for s in chunk[:a_end] for t in s]
      if len(chunk) == 1 or rng.random() < 0.5:
        label = IS_RANDOM
        b = _random_span(docs, d, target - len(a), rng)
        i -= len(chunk) - a_end  # Unused sentences go back for the next chunk.
      else:
        label = IS_NEXT
        b = [t for s in chunk[a_end:] for t in s]
      a, b = _truncate_pair(a, b, max_num_tokens, rng)
      out.append((a, b, label))
      chunk, chunk_len = [], 0
    i += 1


def create_instances(
  token_docs: list[list[list[int]]],
  tokenizer: WordPieceTokenizer,
  *,
  seq_len: int,
  seed: int,
  short_seq_prob: float = 0.1,
  dupe_factor: int = 1,
) -> Instances:
  """Builds NSP instances from tokenized documents, `dupe_factor` passes over the corpus.

  Per document: a target length (max_num_tokens = seq_len - 3, or with `short_seq_prob` a
  uniform length in [2, max_num_tokens]); sentences are gathered until the target, A is a
  random number of leading sentences, B the rest (label 0) or, with probability 1/2 and always
  for a one-sentence chunk, a span of another document (label 1, the rest of the chunk is
  reused). The pair is truncated to max_num_tokens. Output arrays are i32[N, T] / i32[N].
  """
  if seq_len < 5:
    raise ValueError(f"seq_len={seq_len} must be >= 5 to hold [CLS] A [SEP] B [SEP]")
  if not 0.0 <= short_seq_prob <= 1.0:
    raise ValueError(f"short_seq_prob={short_seq_prob} must be in [0, 1]")
  if dupe_factor < 1:
    raise ValueError(f"dupe_factor={dupe_factor} must be >= 1")
  if len(token_docs) < 2:
    raise ValueError(
      f"documents: {len(token_docs)} non-empty document(s); NSP needs at "
      "least 2 to draw random next segments from another document"
    )
  rng = np.random.default_rng([seed, 0])
  pairs = []
  for _ in range(dupe_factor):
    for d in range(len(token_docs)):
      _document_pairs(token_docs, d, seq_len - 3, short_seq_prob, rng, pairs)
  n = len(pairs)
  tokens = np.zeros((n, seq_len), np.int32)
  segment_ids = np.zeros((n, seq_len), np.int32)
  lengths = np.zeros(n, np.int32)
  labels = np.zeros(n, np.int32)
  cls, sep = tokenizer.cls_id, tokenizer.sep_id
  for row, (a, b, label) in enumerate(pairs):
    ids = [cls, *a, sep, *b, sep]
    tokens[row, : len(ids)] = ids
    segment_ids[row, len(a) + 2 : len(ids)] = 1
    lengths[row], labels[row] = len(ids), label
  return Instances(tokens, segment_ids, lengths, labels)


def num_to_mask(num_tokens: int, masked_lm_prob: float, max_predictions: int) -> int:
  """google-research/bert's count: min(P, max(1, round(len * prob))), [CLS]/[SEP]s counted.

  Python's round is half-to-even: 30 tokens * 0.15 = 4.5 -> 4, 70 * 0.15 = 10.5 -> 10.
  """
  return min(max_predictions, max(1, round(num_tokens * masked_lm_prob)))


def maskable_positions(tokens: np.ndarray, lengths: np.ndarray, excluded_ids) -> np.ndarray:
  """bool[N, T]: mask candidates, the real tokens (i32[N] lengths) whose id is not excluded.

  google-research/bert excludes only [CLS] and [SEP] (an [UNK] may be masked); HF's collator
  excludes every special token. tokens: i32[N, T].
  """
  is_excluded = np.isin(tokens, np.fromiter(excluded_ids, np.int64))
  real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return real & ~is_excluded


def _gather_selected(
  selected_order: np.ndarray,
  valid: np.ndarray,
  tokens: np.ndarray,
  kind_u: np.ndarray,
  random_ids: np.ndarray,
  mask_id: int,
) -> dict:
  """Sorts chosen positions, applies 80/10/10 and packs the gathered [N, P] arrays.

  selected_order: i[N, P] chosen positions; valid: bool[N, P] which slots are used;
  tokens: i32[N, T]; kind_u: f[N, P] uniforms; random_ids: i[N, P] replacement ids.
  """
  positions = np.sort(np.where(valid, selected_order, tokens.shape[1]), axis=1)
  valid = positions < tokens.shape[1]  # Used slots first, in position order.
  positions = np.where(valid, positions, 0).astype(np.int32)
  original = np.take_along_axis(tokens, positions, axis=1)
  new = np.where(
    kind_u < MASK_PROB, mask_id, np.where(kind_u < MASK_PROB + RANDOM_PROB, random_ids, original)
  )
  new = np.where(valid, new, original)  # Unused slots rewrite [CLS] at position 0 unchanged.
  input_ids = tokens.copy()
  np.put_along_axis(input_ids, positions, new.astype(np.int32), axis=1)
  return dict(
    input_ids=input_ids,
    masked_lm_positions=positions,
    masked_lm_ids=np.where(valid, original, 0).astype(np.int32),
    masked_lm_weights=valid.astype(np.float32),
  )


def _whole_word_choice(
  maskable: np.ndarray, continues: np.ndarray, counts: np.ndarray, max_predictions: int, rng
) -> tuple[np.ndarray, np.ndarray]:
  """Shuffles each row's words and adds whole words while they fit under the row's count.

  The reference's rule: a word that would overshoot the count is skipped (never split) and
  later, shorter words may still fit. maskable, continues: bool[N, T] ('##' piece of the word
  to its left); counts: i[N]. Returns positions i64[N, P] (sorted) and used bool[N, P].
  """
  n, t = maskable.shape
  starts = maskable & ~continues
  # Word length at each start: 1 + the run of continuation pieces that follows it.
  # Loops run over T on transposed (contiguous) copies, vectorised over the N rows.
  continues_tn = np.ascontiguousarray(continues.T)
  run_tn = np.zeros((t + 1, n), np.int64)
  for col in range(t - 1, -1, -1):
    run_tn[col] = np.where(continues_tn[col], run_tn[col + 1] + 1, 0)
  word_len = np.where(starts, 1 + run_tn[1:].T, 0)
  # Random priorities give a uniformly shuffled word order; the greedy pass is vectorised
  # over rows, one word rank at a time.
  by_rank = np.argsort(np.where(starts, rng.random((n, t)), 2.0), axis=1, kind="stable")
  len_by_rank_tn = np.ascontiguousarray(np.take_along_axis(word_len, by_rank, axis=1).T)
  total = np.zeros(n, np.int64)
  take_tn = np.zeros((t, n), bool)
  for rank, length in enumerate(len_by_rank_tn):
    take_tn[rank] = (length > 0) & (total + length <= counts)
    total += np.where(take_tn[rank], length, 0)
  chosen_start = np.zeros((n, t), bool)
  np.put_along_axis(chosen_start, by_rank, take_tn.T, axis=1)
  start_of = np.maximum.accumulate(np.where(starts, np.arange(t)[None, :], 0), axis=1)
  chosen = maskable & np.take_along_axis(chosen_start, start_of, axis=1)
  order = np.argsort(~chosen, axis=1, kind="stable")[:, :max_predictions]
  return order, np.arange(max_predictions)[None, :] < total[:, None]


def mask_static(
  instances: Instances,
  tokenizer: WordPieceTokenizer,
  *,
  max_predictions: int,
  masked_lm_prob: float,
  seed: int,
  whole_word: bool = False,
) -> dict:
  """Masks every instance once (google-research/bert): a fixed count of shuffled candidates.

  Per row, num_to_mask(length) candidates (real tokens but [CLS]/[SEP]; with `whole_word`, whole
  words: a token plus its following '##' pieces, never across a [SEP]) are chosen; 80% become
  [MASK], 10% a random id, 10% stay. Returns input_ids i32[N, T], masked_lm_positions i32[N, P],
  masked_lm_ids i32[N, P], masked_lm_weights f32[N, P].
  """
  rng = np.random.default_rng([seed, 1])
  tokens = instances.tokens
  n, t = tokens.shape
  maskable = maskable_positions(tokens, instances.lengths, (tokenizer.cls_id, tokenizer.sep_id))
  counts = np.array(
    [num_to_mask(int(length), masked_lm_prob, max_predictions) for length in instances.lengths],
    np.int64,
  )
  if whole_word:
    previous_maskable = np.pad(maskable[:, :-1], ((0, 0), (1, 0)))
    continues = maskable & previous_maskable & tokenizer.subword_flags()[tokens]
    order, used = _whole_word_choice(maskable, continues, counts, max_predictions, rng)
  else:
    # A uniformly random subset of size count: the first `count` of a random order.
    order = np.argsort(np.where(maskable, rng.random((n, t)), 2.0), axis=1, kind="stable")
    order = order[:, :max_predictions]
    used = (np.arange(max_predictions)[None, :] < counts[:, None]) & np.take_along_axis(
      maskable, order, axis=1
    )
  kind_u = rng.random((n, max_predictions))
  random_ids = rng.integers(0, tokenizer.vocab_size, (n, max_predictions))
  return _gather_selected(order, used, tokens, kind_u, random_ids, tokenizer.mask_id)


def dynamic_draws(
  rng: np.random.Generator, batch: int, seq_len: int, max_predictions: int, vocab_size: int
) -> dict:
  """The random numbers of one dynamic-masking batch, drawn for the global batch.

  Returns select_u f64[B, T], keep_u f64[B, T], kind_u f64[B, P], random_ids i64[B, P]; each
  process slices its rows, so a row's mask does not depend on the number of processes.
  """
  return dict(
    select_u=rng.random((batch, seq_len)),
    keep_u=rng.random((batch, seq_len)),
    kind_u=rng.random((batch, max_predictions)),
    random_ids=rng.integers(0, vocab_size, (batch, max_predictions)),
  )


def count_capped(stats: dict, drawn, max_predictions: int) -> None:
  """Adds to `stats` how many rows drew more dynamic masks than `max_predictions` slots hold,
  and how many predictions the cap dropped (drawn: i32[B] from `mask_dynamic`)."""
  stats["rows"] += len(drawn)
  stats["capped_rows"] += int((drawn > max_predictions).sum())
  stats["dropped_predictions"] += int(np.maximum(drawn - max_predictions, 0).sum())


def mask_dynamic(
  tokens: np.ndarray,
  maskable: np.ndarray,
  draws: dict,
  *,
  masked_lm_prob: float,
  max_predictions: int,
  mask_id: int,
) -> dict:
  """Masks each candidate independently with `masked_lm_prob` (HF's LM data collator).

  tokens: i32[B, T]; maskable: bool[B, T]; draws: `dynamic_draws` rows. A sequence may get
  zero masked tokens. When more than P are drawn, a uniformly random P of them are kept and
  the rest are left unmasked in the input (so every corrupted token is predicted). Returns the
  `mask_static` arrays plus num_drawn i64[B] (tokens drawn before the cap).
  """
  selected = maskable & (draws["select_u"] < masked_lm_prob)
  order = np.argsort(np.where(selected, draws["keep_u"], 2.0), axis=1, kind="stable")
  order = order[:, :max_predictions]
  used = np.take_along_axis(selected, order, axis=1)
  out = _gather_selected(order, used, tokens, draws["kind_u"], draws["random_ids"], mask_id)
  out["num_drawn"] = selected.sum(axis=1)
  return out
