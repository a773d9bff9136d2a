"""Tests for maskax.data.batching: BertBatches format, resume exactness, process sharding."""

import json

import numpy as np
import pytest
from pydoc_data import topics

from maskax.data import batching, bert_data, corpus
from maskax.data import tokenizer as tk

T, P = 16, 4
KEYS = {
  "input_ids": np.int32,
  "segment_ids": np.int32,
  "input_mask": np.bool_,
  "masked_lm_positions": np.int32,
  "masked_lm_ids": np.int32,
  "masked_lm_weights": np.float32,
  "next_sentence_labels": np.int32,
  "original_ids": np.int32,
}


@pytest.fixture(scope="module")
def docs():
  return [corpus.split_sentences(topics.topics[k]) for k in sorted(topics.topics)[:12]]


@pytest.fixture(scope="module")
def tok(docs):
  return tk.WordPieceTokenizer(tk.train_wordpiece(docs, 500))


@pytest.fixture(scope="module")
def instances(tok, docs):
  # ~60 instances: epochs of a few batches, so resume tests cross epoch boundaries.
  token_docs = bert_data.tokenize_documents(docs, tok)
  inst = bert_data.create_instances(token_docs, tok, seq_len=T, seed=0)
  keep = slice(0, 61)
  return bert_data.Instances(
    inst.tokens[keep], inst.segment_ids[keep], inst.lengths[keep], inst.next_sentence_labels[keep]
  )


def _batches(instances, tok, masking, n, state=None, **kw):
  it = batching.BertBatches(
    instances,
    tok,
    batch_size=kw.pop("batch_size", 8),
    seq_len=T,
    max_predictions=P,
    masking=masking,
    seed=11,
    **kw,
  )
  if state is not None:
    it.set_state(state)
  return it, [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_batch_format(instances, tok, masking):
  _, (batch,) = _batches(instances, tok, masking, 1, dense_labels=True)
  assert set(batch) == set(KEYS) | {"masked_lm_dense_weights"}
  for key, dtype in KEYS.items():
    assert batch[key].dtype == dtype, key
  assert batch["input_ids"].shape == (8, T) and batch["masked_lm_positions"].shape == (8, P)
  assert batch["next_sentence_labels"].shape == (8,)
  np.testing.assert_array_equal(batch["input_mask"], batch["original_ids"] != 0)
  dense = batch["masked_lm_dense_weights"]
  assert dense.sum() == batch["masked_lm_weights"].sum() > 0
  rows = np.arange(8)[:, None]
  np.testing.assert_array_equal(
    dense[rows, batch["masked_lm_positions"]] > 0, batch["masked_lm_weights"] > 0
  )


@pytest.mark.parametrize("masking", ["static", "dynamic"])
@pytest.mark.parametrize("taken", [3, 9])  # 7 batches per epoch: save in epoch 0, and in epoch 1.
def test_resume_is_bitwise_exact(instances, tok, masking, taken):
  it, first = _batches(instances, tok, masking, taken)
  state = json.loads(json.dumps(it.get_state()))  # Must survive a JSON checkpoint.
  assert state["epoch"] == taken // 7
  after = [next(it) for _ in range(6)]  # From 3 these cross an epoch boundary.
  _, resumed = _batches(instances, tok, masking, 6, state=state)
  for a, b in zip(after, resumed):
    _assert_same(a, b)
  assert not np.array_equal(first[0]["original_ids"], after[0]["original_ids"])


def test_static_masks_fixed_dynamic_redrawn(instances, tok):
  # batch_size = 56 of 61 instances: the same rows recur in epochs 0 and 1 (reshuffled).
  for masking, same in (("static", True), ("dynamic", False)):
    _, (e0, e1) = _batches(instances, tok, masking, 2, batch_size=56)
    by_row = {}
    for batch in (e0, e1):
      for row in range(56):
        key = batch["original_ids"][row].tobytes()
        by_row.setdefault(key, []).append(batch["masked_lm_positions"][row].tobytes())
    pairs = [v for v in by_row.values() if len(v) == 2]
    assert len(pairs) > 40
    agree = sum(a == b for a, b in pairs)
    assert (agree == len(pairs)) if same else (agree < len(pairs) / 2), masking


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_process_shards_form_global_batch(instances, tok, masking):
  _, global_batches = _batches(instances, tok, masking, 9)
  shards = [
    _batches(instances, tok, masking, 9, process_index=p, process_count=2)[1] for p in range(2)
  ]
  for step, full in enumerate(global_batches):
    local = [shards[p][step] for p in range(2)]
    assert local[0]["input_ids"].shape == (4, T)
    for key in full:
      np.testing.assert_array_equal(np.concatenate([lb[key] for lb in local]), full[key])
  sampler = [
    batching.EpochSampler(61, batch_size=8, seed=11, process_index=p, process_count=2)
    for p in range(2)
  ]
  for _ in range(9):
    rows = [set(next(s)[2][s.local_rows]) for s in sampler]
    assert not rows[0] & rows[1] and len(rows[0]) == len(rows[1]) == 4


def test_epochs_cover_each_instance_once():
  sampler = batching.EpochSampler(61, batch_size=8, seed=0, num_epochs=2)
  seen = [(epoch, tuple(rows)) for epoch, _, rows in sampler]
  assert len(seen) == 14  # 7 full batches per epoch, remainder dropped.
  for epoch in (0, 1):
    rows = np.concatenate([r for e, r in seen if e == epoch])
    assert len(set(rows)) == 56
  assert seen[0][1] != seen[7][1]  # Reshuffled per epoch.


def test_dynamic_cap_stats(instances, tok):
  it, _ = _batches(instances, tok, "dynamic", 7)
  assert it.stats["rows"] == 56
  assert 0 <= it.stats["capped_rows"] <= it.stats["dropped_predictions"]


def test_builds_from_documents(docs, tok):
  it = batching.BertBatches(
    docs, tok, batch_size=4, seq_len=T, max_predictions=P, seed=0, dupe_factor=2
  )
  once = batching.BertBatches(
    docs, tok, batch_size=4, seq_len=T, max_predictions=P, seed=0, dupe_factor=1
  )
  assert len(it.instances.lengths) > 1.5 * len(once.instances.lengths)
  _assert_same(
    next(it),
    next(
      batching.BertBatches(
        docs, tok, batch_size=4, seq_len=T, max_predictions=P, seed=0, dupe_factor=2
      )
    ),
  )


@pytest.mark.parametrize(
  "kwargs, key",
  [
    (dict(seq_len=4), "seq_len"),
    (dict(masked_lm_prob=0.0), "masked_lm_prob"),
    (dict(masked_lm_prob=1.0), "masked_lm_prob"),
    (dict(batch_size=3, process_count=2), "batch_size"),
    (dict(max_predictions=T + 1), "max_predictions"),
    (dict(masking="random"), "masking"),
    (dict(masking="dynamic", whole_word_masking=True), "whole_word_masking"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(batch_size=64), "batch_size"),
    (dict(seq_len=T + 1), "seq_len"),
  ],
)
def test_bad_arguments_name_the_key(instances, tok, kwargs, key):
  args = dict(batch_size=8, seq_len=T, max_predictions=P) | kwargs
  with pytest.raises(ValueError, match=key):
    batching.BertBatches(instances, tok, **args)


def test_set_state_mismatch_is_error(instances, tok):
  it, _ = _batches(instances, tok, "static", 1)
  other = batching.BertBatches(instances, tok, batch_size=8, seq_len=T, max_predictions=P, seed=12)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(it.get_state())
  with pytest.raises(ValueError, match="position"):
    it.set_state(dict(it.get_state(), position=99))
