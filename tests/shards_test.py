"""Tests for maskax.data.shards (BERT batches streamed from prepared shards) on tiny corpora.

The reference is the in-memory path (`bert_data`, `BertBatches`) on the same documents. Pairs are
compared exactly (same function, same generator); masks come from keyed hashes instead of one
sequential generator, so their statistics are compared, with tolerances of about 4 standard
deviations of the per-seed spread measured over 6 seeds on this corpus (documents of 8
sentences each, so that no single long document dominates a share).
"""

import json
from pydoc_data import topics

import numpy as np
import pytest

from maskax.data import bert_data, corpus, prepare, prepared, shards
from maskax.data import tokenizer as tk
from maskax.data.batching import BertBatches

T, P = 64, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(prepared folder, documents as the in-memory path reads them, tokenizer)."""
  root = tmp_path_factory.mktemp("shards")
  sentences = [s for k in sorted(topics.topics) for s in corpus.split_sentences(topics.topics[k])]
  docs = [sentences[i : i + 8] for i in range(0, len(sentences) - 7, 8)]
  (root / "corpus.txt").write_text("\n\n".join("\n".join(d) for d in docs) + "\n")
  tok = tk.WordPieceTokenizer(tk.train_wordpiece(docs, 800))
  tok.save(root / "tokenizer.json")
  prepare.prepare([str(root / "corpus.txt")], root / "out", str(root / "tokenizer.json"))
  return root / "out", corpus.load_documents(str(root / "corpus.txt")), tok


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pairs_are_bert_data_pairs(data):
  out, docs, tok = data
  token_docs = bert_data.tokenize_documents(docs, tok)
  it = shards.PreparedBatches(
    out, batch_size=8, seq_len=T, max_predictions=P, seed=3, window_docs=64
  )
  train_docs = [token_docs[g] for g in it.doc_ids]  # The in-memory documents, training split.
  view_index = {int(g): i for i, g in enumerate(it.doc_ids)}
  for _ in range(12):
    plan, start = it._window_plan(), it.position * 8
    batch = next(it)
    for r in range(8):
      doc, j = int(plan["doc"][start + r]), int(plan["pair"][start + r])
      pairs = []
      rng = shards.pair_generator(3, it.epoch % it.dupe_factor, doc)
      bert_data._document_pairs(train_docs, view_index[doc], T - 3, 0.1, rng, pairs)
      a, b, label = pairs[j]
      ids = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
      n = int(batch["input_mask"][r].sum())
      assert batch["original_ids"][r, :n].tolist() == ids and not batch["original_ids"][r, n:].any()
      assert batch["segment_ids"][r].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (
        T - n
      )
      assert batch["next_sentence_labels"][r] == label


def _stats(tokens, lengths, labels, masks, tok):
  used = masks["masked_lm_weights"] > 0
  new = np.take_along_axis(masks["input_ids"], masks["masked_lm_positions"], 1)[used]
  orig = np.take_along_axis(tokens, masks["masked_lm_positions"], 1)[used]
  return dict(
    instances=len(lengths),
    predictions=used.sum(1).mean(),
    mask_share=(new == tok.mask_id).mean(),
    keep_share=(new == orig).mean(),
    short_share=(lengths < T // 2).mean(),
    is_next=(labels == 0).mean(),
  )


# Tolerances: ~4 standard deviations of (in-memory - prepared) over seeds, measured here.
_TOLERANCE = dict(
  instances=0.04,
  predictions=0.25,
  mask_share=0.007,
  keep_share=0.005,
  short_share=0.025,
  is_next=0.03,
)


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_statistics_match_in_memory_path(data, masking):
  out, docs, tok = data
  # Five versions of every document on both sides, for the same spread in both modes.
  memory = BertBatches(
    docs, tok, batch_size=8, seq_len=T, max_predictions=P, masking=masking, seed=0, dupe_factor=5
  )
  inst = memory.instances
  if masking == "static":
    masks = memory._static
  else:
    maskable = bert_data.maskable_positions(inst.tokens, inst.lengths, tok.special_ids)
    draws = bert_data.dynamic_draws(np.random.default_rng(0), len(maskable), T, P, tok.vocab_size)
    masks = bert_data.mask_dynamic(
      inst.tokens, maskable, draws, masked_lm_prob=0.15, max_predictions=P, mask_id=tok.mask_id
    )
  expected = _stats(inst.tokens, inst.lengths, inst.next_sentence_labels, masks, tok)
  it = shards.PreparedBatches(
    out,
    batch_size=8,
    seq_len=T,
    max_predictions=P,
    masking=masking,
    eval_fraction=0.0,
    dupe_factor=5,
  )
  batches = []
  while it.epoch < 5:  # Every version once.
    batches.append(next(it))
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  got = _stats(cat["original_ids"], cat["input_mask"].sum(1), cat["next_sentence_labels"], cat, tok)
  assert abs(got["instances"] / expected["instances"] - 1) < _TOLERANCE["instances"]
  for key in ("predictions", "mask_share", "keep_share", "short_share", "is_next"):
    assert abs(got[key] - expected[key]) < _TOLERANCE[key], (key, got[key], expected[key])
  v = tok.vocab_size  # The 80/10/10 rule itself (a random id may equal the original: 1/V).
  assert abs(got["mask_share"] - (0.8 + 0.1 / v)) < 0.01
  assert abs(got["keep_share"] - (0.1 + 0.1 / v)) < 0.01


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_processes_read_disjoint_rows_of_the_same_global_batch(data, masking):
  out = data[0]
  common = dict(batch_size=8, seq_len=T, max_predictions=P, masking=masking, window_docs=16)
  one = _batches(shards.PreparedBatches(out, **common), 40)  # Crosses window boundaries.
  halves = [
    _batches(shards.PreparedBatches(out, process_index=p, process_count=2, **common), 40)
    for p in (0, 1)
  ]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
  _assert_same(joined, one)
  assert not np.array_equal(halves[0][0]["original_ids"], halves[1][0]["original_ids"])


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_resume_bitwise_and_with_fewer_processes(data, masking):
  out = data[0]
  common = dict(batch_size=8, seq_len=T, max_predictions=P, masking=masking, window_docs=16)
  reference = _batches(shards.PreparedBatches(out, **common), 30)
  two = [shards.PreparedBatches(out, process_index=p, process_count=2, **common) for p in (0, 1)]
  for it in two:
    _batches(it, 22)
  state = json.loads(json.dumps(two[0].get_state()))  # As the checkpoint stores it.
  assert state == two[1].get_state()  # Every process holds the same state.
  resumed = shards.PreparedBatches(out, **common)  # 2 processes -> 1.
  resumed.set_state(state)
  _assert_same(_batches(resumed, 8), reference[22:])
  again = shards.PreparedBatches(out, process_index=1, process_count=2, **common)
  again.set_state(state)
  _assert_same(_batches(again, 8), _batches(two[1], 8))
  with pytest.raises(ValueError, match="seed"):
    shards.PreparedBatches(out, seed=1, **common).set_state(state)


def test_static_masks_repeat_every_dupe_factor_epochs(data):
  it = shards.PreparedBatches(data[0], batch_size=8, seq_len=T, max_predictions=P, dupe_factor=2)

  def masked(epoch):  # {(document, pair): input ids} of every instance of the epoch.
    it.epoch = epoch
    plan = it._window_plan()
    rows = np.arange(len(plan["doc"]))
    ids = it._masks(plan, rows, it._instances(plan, rows))["input_ids"]
    return {(d, j): row.tobytes() for d, j, row in zip(plan["doc"], plan["pair"], ids)}

  first, second, third = masked(0), masked(1), masked(2)
  assert first == third  # Same dupe, same pairs, same masks; only the order changes.
  shared = first.keys() & second.keys()
  assert sum(first[k] != second[k] for k in shared) > 0.9 * len(shared)


def test_held_out_documents_fixed_by_text(data, tmp_path):
  out, docs, _ = data
  common = dict(batch_size=8, seq_len=T, max_predictions=P, eval_fraction=0.1, window_docs=16)
  train = shards.PreparedBatches(out, **common)
  held = shards.PreparedBatches(
    out, split="eval", seed=5, process_index=1, process_count=2, **common
  )
  assert set(held.doc_ids) == set(shards.PreparedBatches(out, split="eval", **common).doc_ids)
  assert not set(train.doc_ids) & set(held.doc_ids)
  assert len(train.doc_ids) + len(held.doc_ids) == len(docs)
  assert abs(len(held.doc_ids) / len(docs) - 0.1) < 4 * np.sqrt(0.09 / len(docs))
  # Every token an eval batch reads (A and B segments) comes from a held-out document.
  starts = np.array([held.docs.sentence_spans(int(g))[0].start for g in held.doc_ids])
  ends = np.array([held.docs.sentence_spans(int(g))[-1].stop for g in held.doc_ids])
  for _ in range(5):
    next(held)
    plan = held._window_plan()
    for field in ("a_start", "b_start"):
      inside = np.searchsorted(starts, plan[field], side="right") - 1
      assert np.all(plan[field] < ends[inside])
  # Another preparation (other file layout, two workers) holds out the same texts.
  (tmp_path / "a.txt").write_text("\n\n".join("\n".join(d) for d in reversed(docs)) + "\n")
  prepare.prepare(
    [str(tmp_path / "a.txt")],
    tmp_path / "out",
    str(out / "tokenizer.json"),
    split_mb=0.05,
    num_workers=2,
  )
  other = shards.PreparedBatches(tmp_path / "out", split="eval", **common)
  assert sorted(other.docs.doc_hashes()[other.doc_ids].tolist()) == sorted(
    held.docs.doc_hashes()[held.doc_ids].tolist()
  )


def test_tiny_corpus_and_documents_longer_than_seq_len(data, tmp_path):
  tok_path = data[0] / "tokenizer.json"
  long_sentence = " ".join(["alpha beta gamma delta"] * 40)  # ~160 tokens in one sentence.
  text = (
    f"{long_sentence}\nShort one.\n\nA second document.\nWith two lines.\n\n"
    + "\n".join(f"Line {i} of a long document about lists." for i in range(30))
    + "\n"
  )
  (tmp_path / "tiny.txt").write_text(text)
  prepare.prepare([str(tmp_path / "tiny.txt")], tmp_path / "out", str(tok_path))
  common = dict(seq_len=16, max_predictions=3, eval_fraction=0.0)
  with pytest.raises(ValueError, match="batch_size=64 exceeds the .* instances"):
    shards.PreparedBatches(tmp_path / "out", batch_size=64, **common)
  it = shards.PreparedBatches(tmp_path / "out", batch_size=4, window_docs=4, **common)
  tok = tk.load(tok_path)
  for batch in _batches(it, 20):  # Several epochs of a corpus of a few batches.
    lengths = batch["input_mask"].sum(1)
    assert lengths.max() <= 16
    for row, n in zip(batch["original_ids"], lengths):
      seps = np.flatnonzero(row[:n] == tok.sep_id)
      assert row[0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1 and 1 < seps[0] < n - 2
  assert it.epoch >= 2


def test_max_documents_reads_a_prefix_on_the_same_sides_of_the_split(data):
  out = data[0]
  common = dict(batch_size=8, seq_len=T, max_predictions=P, eval_fraction=0.2)
  n = prepared.PreparedDocs(out).num_documents // 2
  for split in ("train", "eval"):
    whole = shards.PreparedBatches(out, split=split, **common).doc_ids
    part = shards.PreparedBatches(out, split=split, max_documents=n, **common).doc_ids
    assert 0 < len(part) < len(whole) and part.tolist() == [g for g in whole if g < n]
  with pytest.raises(ValueError, match="max_documents=-1"):
    shards.PreparedBatches(out, max_documents=-1, **common)


def test_unigram_counts_and_validation(data):
  out, docs, tok = data
  it = shards.PreparedBatches(out, batch_size=8, seq_len=T, max_predictions=P, eval_fraction=0.0)
  token_docs = bert_data.tokenize_documents(docs, tok)
  expected = np.bincount([t for d in token_docs for s in d for t in s], minlength=tok.vocab_size)
  np.testing.assert_array_equal(it.unigram_counts(), expected)
  with pytest.raises(ValueError, match="window_docs"):
    shards.PreparedBatches(out, batch_size=8, seq_len=T, max_predictions=P, window_docs=4)
  with pytest.raises(ValueError, match="batch_size"):
    shards.PreparedBatches(out, batch_size=6, seq_len=T, max_predictions=P, process_count=4)
  with pytest.raises(FileNotFoundError, match="maskax.data.prepare"):
    prepared.PreparedDocs(out / "missing")
