"""maskax.data.chars: vocabulary with an unknown id, windows, and the stateful stream layout."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maskax.data import chars


def test_vocab_round_trip_unknown_and_banned():
  vocab = chars.build_vocab("hello world")
  assert vocab.chars == tuple(sorted(set("hello world")))
  assert vocab.size == len(set("hello world")) + 1
  ids = vocab.encode("hold z")
  assert ids.dtype == np.int32 and ids[-1] == chars.UNKNOWN and np.all(ids[:-1] > 0)
  assert vocab.decode(ids) == "hold " + chars.UNKNOWN_CHAR
  assert vocab.decode(vocab.encode("low")) == "low"
  banned = vocab.banned()
  assert banned.dtype == bool and banned.shape == (vocab.size,)
  assert np.flatnonzero(banned).tolist() == [chars.UNKNOWN]
  assert chars.CharVocab.from_json(vocab.to_json()) == vocab
  with pytest.raises(ValueError, match="distinct single characters"):
    chars.CharVocab(("a", "a"))
  with pytest.raises(ValueError, match="non-empty"):
    chars.build_vocab("")


def test_split_tail_is_the_contiguous_end():
  ids = np.arange(100, dtype=np.int32)
  train, held_out = chars.split_tail(ids, 0.1)
  np.testing.assert_array_equal(train, ids[:90])
  np.testing.assert_array_equal(held_out, ids[90:])
  with pytest.raises(ValueError, match="eval_fraction"):
    chars.split_tail(ids, 0.0)


def test_split_text_vocabulary_of_the_training_part_and_saved_round_trip(tmp_path):
  vocab, train, held_out = chars.split_text("abcabcabxy", 0.2)  # held out: "xy"
  assert vocab.chars == ("a", "b", "c")  # x and y are held out: unknown to the model
  assert vocab.decode(train) == "abcabcab" and held_out.tolist() == [chars.UNKNOWN] * 2
  path = str(tmp_path / "run" / "vocab.json")
  chars.save_vocab(path, vocab)
  assert chars.load_vocab(path) == vocab
  again = chars.split_text("xyz" * 4, 0.25, vocab=chars.load_vocab(path))[0]
  assert again == vocab  # a saved vocabulary wins over the text's
  with pytest.raises(FileNotFoundError, match="missing"):
    chars.load_vocab(str(tmp_path / "none.json"))


def test_unigram_bpc_is_add_one_smoothed_cross_entropy():
  train, held_out = np.array([1, 1, 1, 2]), np.array([1, 2, 2])
  p = np.array([1, 4, 2]) / 7  # counts + 1 over V = 3 ids
  want = -np.mean(np.log2(p[held_out]))
  assert chars.unigram_bpc(train, held_out, 3) == pytest.approx(want)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 80), seq_len=st.integers(1, 12))
def test_windows_shift_by_one_and_every_target_appears_once(n, seq_len):
  ids = np.arange(n, dtype=np.int32)
  if n < seq_len + 1:
    with pytest.raises(ValueError, match="seq_len"):
      chars.windows(ids, seq_len)
    return
  w = chars.windows(ids, seq_len)
  count = (n - 1) // seq_len
  assert w["inputs"].shape == w["targets"].shape == (count, seq_len)
  np.testing.assert_array_equal(w["targets"], w["inputs"] + 1)
  np.testing.assert_array_equal(w["inputs"][:, 0], np.arange(count) * seq_len)
  # Every character after the first is a target exactly once (up to the dropped tail).
  np.testing.assert_array_equal(np.sort(w["targets"].ravel()), np.arange(1, count * seq_len + 1))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 300), streams=st.integers(1, 6), seq_len=st.integers(1, 10))
def test_stream_layout_window_k_plus_1_continues_window_k(n, streams, seq_len):
  ids = (np.arange(n, dtype=np.int32) * 7919) % 1009  # distinct values, not just positions
  if (n - 1) // streams < seq_len:
    with pytest.raises(ValueError, match="streams"):
      chars.stream_windows(ids, streams, seq_len)
    return
  layout = chars.stream_windows(ids, streams, seq_len)
  x, y = layout["inputs"], layout["targets"]
  stride = (n - 1) // streams
  count = stride // seq_len
  assert x.shape == y.shape == (streams, count, seq_len)
  for b in range(streams):
    # Stream b read window after window is one contiguous run of the text, shifted by one.
    text = ids[b * stride : b * stride + count * seq_len + 1]
    np.testing.assert_array_equal(x[b].ravel(), text[:-1])
    np.testing.assert_array_equal(y[b].ravel(), text[1:])
    np.testing.assert_array_equal(x[b, 1:, 0], y[b, :-1, -1])
  # Streams do not overlap: each input character is read once.
  positions = (np.arange(streams)[:, None] * stride + np.arange(count * seq_len)[None, :]).ravel()
  assert len(np.unique(positions)) == positions.size


def _stream_ids(n=203):
  return np.arange(n, dtype=np.int32)


def test_stream_batches_carry_over_between_consecutive_batches():
  ids = _stream_ids()
  data = chars.StreamBatches(ids, batch_size=4, seq_len=5)
  assert data.windows_per_epoch == (202 // 4) // 5
  batches = [next(data) for _ in range(2 * data.windows_per_epoch + 1)]
  for k, (a, b) in enumerate(zip(batches, batches[1:])):
    assert a["inputs"].shape == (4, 5) and a["reset"].shape == (4,)
    if (k + 1) % data.windows_per_epoch:
      # Row b of batch k + 1 starts exactly where row b of batch k ended.
      np.testing.assert_array_equal(b["inputs"][:, 0], a["targets"][:, -1])
      np.testing.assert_array_equal(b["inputs"][:, 0], a["inputs"][:, -1] + 1)
      assert not b["reset"].any()
    else:
      assert b["reset"].all()  # a new epoch: the streams wrap to their starts
  assert batches[0]["reset"].all()
  np.testing.assert_array_equal(batches[0]["inputs"][:, 0], np.arange(4) * (202 // 4))


def test_stream_batches_resume_and_split_over_processes():
  ids = _stream_ids()
  full = chars.StreamBatches(ids, 4, 5)
  expected = [next(full) for _ in range(7)]
  resumed = chars.StreamBatches(ids, 4, 5)
  resumed.set_state({"position": 3})
  for want in expected[3:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  halves = [chars.StreamBatches(ids, 4, 5, process_index=i, process_count=2) for i in range(2)]
  for want in expected:
    parts = [next(h) for h in halves]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])
  with pytest.raises(ValueError, match="split evenly"):
    chars.StreamBatches(ids, 3, 5, process_count=2)


def test_shuffled_windows_mark_resets():
  ids = _stream_ids()
  stateless = next(chars.shuffled_windows(ids, 4, 5, seed=0))
  assert stateless["reset"].all() and stateless["inputs"].shape == (4, 5)
  np.testing.assert_array_equal(stateless["targets"], stateless["inputs"] + 1)
  buggy = next(chars.shuffled_windows(ids, 4, 5, seed=0, reset=False))
  assert not buggy["reset"].any()
  np.testing.assert_array_equal(buggy["inputs"], stateless["inputs"])


def test_pad_prompts_ragged():
  vocab = chars.build_vocab("abc ")
  ids, lengths = chars.pad_prompts(["ab", "c", "a b"], vocab)
  assert ids.shape == (3, 3) and lengths.tolist() == [2, 1, 3]
  assert vocab.decode(ids[1, :1]) == "c"
  assert ids[1, 1] == chars.UNKNOWN and ids[0, 2] == chars.UNKNOWN
  with pytest.raises(ValueError, match="at least one character"):
    chars.pad_prompts(["ab", ""], vocab)
