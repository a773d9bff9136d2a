"""Tests for maskax.data.bert_data: NSP pairs, static/dynamic/whole-word masking.

Statistical checks use 4-sigma binomial tolerances (a false failure about once in 16,000 runs);
the draws are seeded, so each test is deterministic anyway.
"""

import numpy as np
import pytest
from pydoc_data import topics

from maskax.data import bert_data, corpus
from maskax.data import tokenizer as tk

T, P = 32, 8


def _within_4_sigma(count, n, p):
  return abs(count / n - p) <= 4 * np.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def tok():
  docs = [corpus.split_sentences(topics.topics[k]) for k in sorted(topics.topics)]
  return tk.WordPieceTokenizer(tk.train_wordpiece(docs, 800))


@pytest.fixture(scope="module")
def token_docs(tok):
  docs = [corpus.split_sentences(topics.topics[k]) for k in sorted(topics.topics)]
  return bert_data.tokenize_documents(docs, tok)


@pytest.fixture(scope="module")
def instances(tok, token_docs):
  return bert_data.create_instances(token_docs, tok, seq_len=T, seed=0, dupe_factor=1)


@pytest.fixture(scope="module")
def static(tok, instances):
  return bert_data.mask_static(instances, tok, max_predictions=P, masked_lm_prob=0.15, seed=0)


def _synthetic(tok, lengths, seq_len, seed=0):
  """Instances of given lengths: [CLS] words [SEP] words [SEP], words drawn from non-specials."""
  rng = np.random.default_rng(seed)
  n = len(lengths)
  tokens = np.zeros((n, seq_len), np.int32)
  segments = np.zeros((n, seq_len), np.int32)
  for row, length in enumerate(lengths):
    tokens[row, :length] = rng.integers(5, tok.vocab_size, length)
    mid = length // 2
    tokens[row, [0, mid, length - 1]] = tok.cls_id, tok.sep_id, tok.sep_id
    segments[row, mid + 1 : length] = 1
  lengths = np.asarray(lengths, np.int32)
  return bert_data.Instances(tokens, segments, lengths, np.zeros(n, np.int32))


@pytest.mark.parametrize(
  "length, cap, expected",
  [(30, 20, 4), (70, 20, 10), (128, 20, 19), (200, 20, 20), (3, 20, 1), (128, 5, 5)],
)
def test_num_to_mask_half_even(length, cap, expected):
  assert bert_data.num_to_mask(length, 0.15, cap) == expected


def test_static_count_per_row(tok):
  lengths = [30, 70, 128, 200, 5]
  inst = _synthetic(tok, lengths, seq_len=200)
  out = bert_data.mask_static(inst, tok, max_predictions=20, masked_lm_prob=0.15, seed=1)
  np.testing.assert_array_equal(out["masked_lm_weights"].sum(1), [4, 10, 19, 20, 1])


def _check_gathered(out, tokens, tok):
  positions, ids = out["masked_lm_positions"], out["masked_lm_ids"]
  weights = out["masked_lm_weights"]
  used = weights > 0
  assert np.all(positions[~used] == 0) and np.all(ids[~used] == 0) and np.all(weights[~used] == 0)
  assert np.all(np.sort(used, axis=1)[:, ::-1] == used)  # Used slots come first.
  big = np.where(used, positions, tokens.shape[1] + np.arange(used.shape[1]))
  assert np.all(np.diff(big, axis=1) > 0)  # Strictly increasing positions.
  np.testing.assert_array_equal(ids[used], np.take_along_axis(tokens, positions, 1)[used])
  hit = np.zeros(tokens.shape, bool)
  np.put_along_axis(hit, positions, used, axis=1)
  assert not np.isin(tokens[hit], [tok.cls_id, tok.sep_id, tok.pad_id]).any()
  assert np.all(out["input_ids"][~hit] == tokens[~hit])  # Only predicted slots change.
  return hit


def test_static_gathered_format(tok, instances, static):
  hit = _check_gathered(static, instances.tokens, tok)
  candidates = bert_data.maskable_positions(
    instances.tokens, instances.lengths, (tok.cls_id, tok.sep_id)
  ).sum(1)
  expected = [
    min(bert_data.num_to_mask(int(n), 0.15, P), int(c))
    for n, c in zip(instances.lengths, candidates)
  ]
  np.testing.assert_array_equal(hit.sum(1), expected)


def _replacement_split(out, tokens, mask_id):
  used = out["masked_lm_weights"] > 0
  new = np.take_along_axis(out["input_ids"], out["masked_lm_positions"], 1)[used]
  orig = np.take_along_axis(tokens, out["masked_lm_positions"], 1)[used]
  return (new == mask_id).sum(), (new == orig).sum(), ((new != mask_id) & (new != orig)).sum()


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_80_10_10(tok, instances, static, masking):
  if masking == "static":
    out = static
  else:
    rng = np.random.default_rng(5)
    maskable = bert_data.maskable_positions(instances.tokens, instances.lengths, tok.special_ids)
    out = bert_data.mask_dynamic(
      instances.tokens,
      maskable,
      bert_data.dynamic_draws(rng, len(maskable), T, T, tok.vocab_size),
      masked_lm_prob=0.15,
      max_predictions=T,
      mask_id=tok.mask_id,
    )
  masked, kept, randomised = _replacement_split(out, instances.tokens, tok.mask_id)
  n = masked + kept + randomised
  assert n > 3000
  v = tok.vocab_size  # A random id equals the original (or is [MASK]) with odds 1/V.
  assert _within_4_sigma(masked, n, 0.8 + 0.1 / v)
  assert _within_4_sigma(kept, n, 0.1 + 0.1 / v)
  assert _within_4_sigma(randomised, n, 0.1 * (1 - 2 / v))


def test_dynamic_rate_redraw_zero_and_cap(tok, instances):
  tokens = instances.tokens
  maskable = bert_data.maskable_positions(tokens, instances.lengths, tok.special_ids)
  n = len(tokens)

  def draw(seed, cap):
    rng = np.random.default_rng(seed)
    draws = bert_data.dynamic_draws(rng, n, T, cap, tok.vocab_size)
    return bert_data.mask_dynamic(
      tokens, maskable, draws, masked_lm_prob=0.15, max_predictions=cap, mask_id=tok.mask_id
    )

  first, second = draw(1, T), draw(2, T)
  hit = _check_gathered(first, tokens, tok)
  assert _within_4_sigma(hit.sum(), maskable.sum(), 0.15)
  assert np.array_equal(first["num_drawn"], hit.sum(1))
  assert not np.array_equal(first["masked_lm_positions"], second["masked_lm_positions"])
  assert (first["masked_lm_weights"].sum(1) == 0).any()  # Zero masked tokens is allowed.
  # Short rows show it: [CLS] a [SEP] b [SEP] has no mask with odds 0.85**2.
  short = _synthetic(tok, [5] * 400, seq_len=8)
  out = bert_data.mask_dynamic(
    short.tokens,
    bert_data.maskable_positions(short.tokens, short.lengths, tok.special_ids),
    bert_data.dynamic_draws(np.random.default_rng(0), 400, 8, 2, tok.vocab_size),
    masked_lm_prob=0.15,
    max_predictions=2,
    mask_id=tok.mask_id,
  )
  assert _within_4_sigma((out["masked_lm_weights"].sum(1) == 0).sum(), 400, 0.85**2)
  capped = draw(1, 2)
  hit_capped = _check_gathered(capped, tokens, tok)
  assert hit_capped.sum(1).max() == 2 and (capped["num_drawn"] > 2).any()
  assert np.all(hit_capped.sum(1) == np.minimum(capped["num_drawn"], 2))


def test_unk_maskable_in_static_only(tok):
  # google-research/bert skips only [CLS]/[SEP]; HF's collator skips every special token.
  inst = _synthetic(tok, [40] * 50, seq_len=40)
  tokens = np.where(np.isin(inst.tokens, [tok.cls_id, tok.sep_id]), inst.tokens, tok.unk_id)
  unk = bert_data.Instances(tokens, inst.segment_ids, inst.lengths, inst.next_sentence_labels)
  static = bert_data.mask_static(unk, tok, max_predictions=P, masked_lm_prob=0.15, seed=0)
  assert np.all(static["masked_lm_weights"].sum(1) == 6)
  assert np.all(static["masked_lm_ids"][static["masked_lm_weights"] > 0] == tok.unk_id)
  maskable = bert_data.maskable_positions(unk.tokens, unk.lengths, tok.special_ids)
  assert not maskable.any()


def _words(row_tokens, length, tok):
  """Plain-loop reference grouping: a word is a token plus its following '##' pieces."""
  words, special = [], {tok.cls_id, tok.sep_id}
  for i in range(length):
    t = int(row_tokens[i])
    if t in special:
      continue
    if words and tok.is_subword(t) and words[-1][-1] == i - 1:
      words[-1].append(i)
    else:
      words.append([i])
  return words


def test_whole_word_masking_never_splits(tok, instances):
  out = bert_data.mask_static(
    instances, tok, max_predictions=P, masked_lm_prob=0.15, seed=3, whole_word=True
  )
  hit = _check_gathered(out, instances.tokens, tok)
  multi_piece_masked = 0
  for row in range(len(hit)):
    length = int(instances.lengths[row])
    count = bert_data.num_to_mask(length, 0.15, P)
    words = _words(instances.tokens[row], length, tok)
    chosen = [w for w in words if hit[row, w].any()]
    assert all(hit[row, w].all() for w in chosen)
    total = sum(len(w) for w in chosen)
    assert total == hit[row].sum() <= count
    # Greedy rule: every word left out was too long for the room that remained.
    assert all(len(w) > count - total for w in words if not hit[row, w].any())
    multi_piece_masked += sum(len(w) > 1 for w in chosen)
  assert multi_piece_masked > 50


def test_truncate_pair_longer_side_random_end():
  a, b = list(range(10)), [100, 101, 102]
  fronts = []
  for seed in range(400):
    ta, tb = bert_data._truncate_pair(a, b, 8, np.random.default_rng(seed))
    assert tb == b and len(ta) == 5 and ta == list(range(ta[0], ta[0] + 5))
    fronts.append(ta[0])
  assert _within_4_sigma(sum(fronts), 400 * 5, 0.5)  # Each removal is from the front w.p. 1/2.
  ta, tb = bert_data._truncate_pair([1] * 4, [2] * 9, 6, np.random.default_rng(0))
  assert (len(ta), len(tb)) == (3, 3)  # Trims whichever side is longer at each step.


def test_segments_and_separators(tok, instances):
  for row in range(len(instances.lengths)):
    ids, seg, n = instances.tokens[row], instances.segment_ids[row], int(instances.lengths[row])
    seps = np.flatnonzero(ids == tok.sep_id)
    assert ids[0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1
    assert 1 < seps[0] < n - 2  # Both A and B hold at least one token.
    np.testing.assert_array_equal(
      seg, np.r_[np.zeros(seps[0] + 1), np.ones(n - seps[0] - 1), np.zeros(T - n)]
    )
    assert np.all(ids[n:] == 0)
  assert instances.lengths.max() == T
  assert instances.input_mask.sum() == instances.lengths.sum()


def test_short_seq_prob_shortens(tok, token_docs):
  def mean_length(prob):
    inst = bert_data.create_instances(token_docs, tok, seq_len=64, seed=0, short_seq_prob=prob)
    return inst.lengths.mean()

  # Targets are drawn per document; a short target still takes whole sentences, so the
  # effect on lengths is smaller than the target's.
  assert mean_length(1.0) < 0.9 * mean_length(0.0)  # 54 vs 64 tokens here.


def test_nsp_coin_and_random_segment_source(tok):
  # Document d = two 6-token sentences [100+2d]*6, [101+2d]*6; with seq_len 16 a chunk holds
  # both, so A = first sentence and the IsNext coin decides; a random B puts the second
  # sentence back, which then forms a one-sentence chunk whose B is always random.
  num_docs = 1000
  docs = [[[100 + 2 * d] * 6, [101 + 2 * d] * 6] for d in range(num_docs)]
  inst = bert_data.create_instances(
    docs, tok, seq_len=16, seed=7, short_seq_prob=0.0, dupe_factor=3
  )
  coin = is_next = forced = 0
  for row in range(len(inst.lengths)):
    ids = inst.tokens[row, : inst.lengths[row]]
    sep = int(np.flatnonzero(ids == tok.sep_id)[0])
    a, b, label = ids[1:sep], ids[sep + 1 : -1], inst.next_sentence_labels[row]
    d, second = divmod(int(a[0]) - 100, 2)
    assert np.all(a == a[0])
    if label == bert_data.IS_NEXT:
      assert not second and np.all(b == 101 + 2 * d)
    else:
      assert not np.isin(b, [100 + 2 * d, 101 + 2 * d]).any()  # From another document.
    coin += not second
    forced += second
    is_next += label == bert_data.IS_NEXT
  assert coin == 3 * num_docs
  assert forced == coin - is_next  # Each random B put one sentence back.
  assert _within_4_sigma(is_next, coin, 0.5)


def test_create_instances_validates(tok, token_docs):
  with pytest.raises(ValueError, match="seq_len"):
    bert_data.create_instances(token_docs, tok, seq_len=4, seed=0)
  with pytest.raises(ValueError, match="documents"):
    bert_data.create_instances(token_docs[:1], tok, seq_len=16, seed=0)
  with pytest.raises(ValueError, match="dupe_factor"):
    bert_data.create_instances(token_docs, tok, seq_len=16, seed=0, dupe_factor=0)
