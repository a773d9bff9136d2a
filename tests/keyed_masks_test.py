"""Tests for maskax.data.keyed_masks: hashed uniforms and bert_data's masking rules on them."""

from pydoc_data import topics

import numpy as np
import pytest

from maskax.data import bert_data, corpus, keyed_masks
from maskax.data import tokenizer as tk

T, P = 32, 8


@pytest.fixture(scope="module")
def tok():
  docs = [corpus.split_sentences(topics.topics[k]) for k in sorted(topics.topics)]
  return tk.WordPieceTokenizer(tk.train_wordpiece(docs, 800))


@pytest.fixture(scope="module")
def instances(tok):
  docs = [corpus.split_sentences(topics.topics[k]) for k in sorted(topics.topics)]
  return bert_data.create_instances(bert_data.tokenize_documents(docs, tok), tok, seq_len=T, seed=0)


def test_uniforms_are_uniform_and_keyed():
  keys = keyed_masks.row_keys(7, np.arange(2000))
  u = keyed_masks.uniforms(keys, 64, keyed_masks.SELECT)
  assert u.shape == (2000, 64) and u.min() >= 0 and u.max() < 1
  counts = np.histogram(u, bins=16, range=(0, 1))[0]
  expected = u.size / 16
  assert ((counts - expected) ** 2 / expected).sum() < 60  # chi2(15): p ~ 1e-7 beyond 60.
  assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1
  np.testing.assert_array_equal(u[5:9], keyed_masks.uniforms(keys[5:9], 64, keyed_masks.SELECT))
  other = keyed_masks.uniforms(keys, 64, keyed_masks.KIND)
  assert (other != u).mean() > 0.999
  assert keyed_masks.row_keys(1, 2) != keyed_masks.row_keys(2, 1)
  ints = keyed_masks.integers(keys, 64, keyed_masks.RANDOM_ID, 10)
  assert ints.min() == 0 and ints.max() == 9


def test_static_rules_per_row_whatever_its_batch(tok, instances):
  keys = keyed_masks.row_keys(1, np.arange(len(instances.lengths)))
  out = keyed_masks.mask_static(
    instances.tokens, instances.lengths, keys, tok, max_predictions=P, masked_lm_prob=0.15
  )
  used = out["masked_lm_weights"] > 0
  candidates = bert_data.maskable_positions(
    instances.tokens, instances.lengths, (tok.cls_id, tok.sep_id)
  ).sum(1)
  expected = [
    min(bert_data.num_to_mask(int(n), 0.15, P), int(c))
    for n, c in zip(instances.lengths, candidates)
  ]
  np.testing.assert_array_equal(used.sum(1), expected)
  hit = np.take_along_axis(instances.tokens, out["masked_lm_positions"], 1)[used]
  assert not np.isin(hit, [tok.cls_id, tok.sep_id, tok.pad_id]).any()
  # A row's mask is the same when masked alone (another batch, process or resume).
  alone = keyed_masks.mask_static(
    instances.tokens[7:8],
    instances.lengths[7:8],
    keys[7:8],
    tok,
    max_predictions=P,
    masked_lm_prob=0.15,
  )
  for k in alone:
    np.testing.assert_array_equal(alone[k][0], out[k][7])


def test_whole_word_masking_never_splits_a_word(tok, instances):
  keys = keyed_masks.row_keys(2, np.arange(len(instances.lengths)))
  out = keyed_masks.mask_static(
    instances.tokens,
    instances.lengths,
    keys,
    tok,
    max_predictions=P,
    masked_lm_prob=0.15,
    whole_word=True,
  )
  hit = np.zeros(instances.tokens.shape, bool)
  np.put_along_axis(hit, out["masked_lm_positions"], out["masked_lm_weights"] > 0, axis=1)
  continues = tok.subword_flags()[instances.tokens] & ~np.isin(
    instances.tokens, [tok.cls_id, tok.sep_id]
  )
  continues[:, 0] = False
  # A '##' piece is masked exactly when the token before it is (same word, never split).
  inner = continues & np.roll(~np.isin(instances.tokens, [tok.cls_id, tok.sep_id]), 1, axis=1)
  assert np.array_equal(hit[inner], np.roll(hit, 1, axis=1)[inner])
  assert (hit & inner).sum() > 50  # Multi-piece words were masked.
  counts = [bert_data.num_to_mask(int(n), 0.15, P) for n in instances.lengths]
  assert np.all(hit.sum(1) <= counts)


def test_dynamic_draws_mask_about_15_percent(tok, instances):
  keys = keyed_masks.row_keys(3, np.arange(len(instances.lengths)))
  maskable = bert_data.maskable_positions(instances.tokens, instances.lengths, tok.special_ids)
  out = bert_data.mask_dynamic(
    instances.tokens,
    maskable,
    keyed_masks.dynamic_draws(keys, T, T, tok.vocab_size),
    masked_lm_prob=0.15,
    max_predictions=T,
    mask_id=tok.mask_id,
  )
  n, rate = maskable.sum(), out["masked_lm_weights"].sum() / maskable.sum()
  assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
