"""maskax.data.translation: number names, vocabularies, padded arrays, TSV loading, buckets."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maskax.data import translation as tr

_VALUES = {w: i for i, w in enumerate(tr._ONES)}
_VALUES.update({w: 10 * i for i, w in enumerate(tr._TENS) if w})
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}


def parse(words, style):
  """An independent reader of the four styles: tokens -> number."""
  if style == "digits":
    return int("".join(str(_VALUES[w]) for w in words))
  total, group = 0, 0
  for w in words:
    if w in _SCALES:
      total, group = total + group * _SCALES[w], 0
    elif style == "mixed":
      group = group * 10 + int(w)
    elif w == "hundred":
      group *= 100
    elif w in ("and", ","):
      continue
    else:
      group += sum(_VALUES[part] for part in w.split("-"))
  return total + group


def test_number_words_golden():
  assert " ".join(tr.number_words(321405, "british")) == (
    "three hundred and twenty-one thousand , four hundred and five"
  )
  assert " ".join(tr.number_words(321405, "american")) == (
    "three hundred twenty one thousand four hundred five"
  )
  assert " ".join(tr.number_words(321405, "digits")) == "three two one four zero five"
  assert " ".join(tr.number_words(321405, "mixed")) == "3 2 1 thousand 4 0 5"
  assert " ".join(tr.number_words(1005, "british")) == "one thousand and five"
  assert tr.number_words(0, "british") == ["zero"] and tr.number_words(0, "mixed") == ["0"]
  assert " ".join(tr.canonical_digits(1005)) == "1 , 0 0 5"


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**12 - 1), st.sampled_from(tr.STYLES))
def test_every_style_reads_back_to_its_number(n, style):
  assert parse(tr.number_words(n, style), style) == n
  assert int("".join(tr.canonical_digits(n)).replace(",", "")) == n


def test_number_words_rejects_bad_input():
  with pytest.raises(ValueError, match="style"):
    tr.number_words(5, "french")
  with pytest.raises(ValueError, match="n must"):
    tr.number_words(10**12, "digits")


def test_generation_is_deterministic_and_respects_exclude():
  a, na = tr.generate_numbers(200, seed=3, max_digits=5)
  b, nb = tr.generate_numbers(200, seed=3, max_digits=5)
  c, _ = tr.generate_numbers(200, seed=4, max_digits=5)
  assert a == b and na == nb and a != c
  assert {len(str(n)) for n in na} == {1, 2, 3, 4, 5}
  held, nh = tr.generate_numbers(100, seed=9, max_digits=5, exclude=frozenset(na))
  assert not set(nh) & set(na)
  with pytest.raises(ValueError, match="cannot draw"):
    tr.generate_numbers(11, seed=0, max_digits=1, exclude=frozenset(range(10)))


def test_vocabulary_frequency_order_cap_and_padding():
  lists = [["d", "a", "c"], ["a", "c"], ["a"], ["b"]]  # a:3, c:2, then b:1 and d:1 (a tie)
  full = tr.build_vocabulary(lists)
  assert full.words == tr.SPECIALS + ("a", "c", "b", "d") and full.num_real == 8
  capped = tr.build_vocabulary(lists, size=6)
  assert capped.words == tr.SPECIALS + ("a", "c")
  assert capped.encode(["a", "b", "zz"]) == [4, tr.UNK, tr.UNK]
  padded = tr.build_vocabulary(lists, size=50, lexicon_seed=1)
  assert len(padded) == 50 and padded.num_real == 8 and len(set(padded.words)) == 50
  assert padded.words[:8] == full.words
  assert padded.decode([tr.GO, 4, 5, tr.EOS, 6, tr.PAD]) == ["a", "c"]
  with pytest.raises(ValueError, match="vocabulary size"):
    tr.build_vocabulary(lists, size=3)


def test_encode_pairs_places_go_eos_and_drops_long_pairs():
  pairs = [(["x", "y"], ["1"]), (["x"], ["2", "1"]), (["x"] * 5, ["1"]), (["y"], ["1"] * 4)]
  sv = tr.build_vocabulary([s for s, _ in pairs])
  tv = tr.build_vocabulary([t for _, t in pairs])
  arrays, dropped = tr.encode_pairs(pairs, sv, tv, max_source_len=3, max_target_len=2)
  assert dropped == 2
  assert arrays["source"].shape == (2, 3) and arrays["target_in"].shape == (2, 3)
  np.testing.assert_array_equal(arrays["source_len"], [2, 1])
  np.testing.assert_array_equal(arrays["target_len"], [2, 3])
  one, two = tv.encode(["1", "2"])
  np.testing.assert_array_equal(arrays["target_in"], [[tr.GO, one, tr.PAD], [tr.GO, two, one]])
  np.testing.assert_array_equal(arrays["target_out"], [[one, tr.EOS, tr.PAD], [two, one, tr.EOS]])
  assert arrays["source"][1, 1] == tr.PAD


def test_load_tsv(tmp_path):
  path = tmp_path / "pairs.tsv"
  path.write_text("guten tag\tgood day\n\nja\tyes\n", encoding="utf-8")
  assert tr.load_tsv(str(path)) == [(["guten", "tag"], ["good", "day"]), (["ja"], ["yes"])]
  path.write_text("ok\tfine\nno tab here\n", encoding="utf-8")
  with pytest.raises(ValueError, match=":2:"):
    tr.load_tsv(str(path))


def test_bucket_batches_cover_every_row_once_in_few_shapes():
  pairs, _ = tr.generate_numbers(70, seed=1, max_digits=6)
  sv = tr.build_vocabulary([s for s, _ in pairs])
  tv = tr.build_vocabulary([t for _, t in pairs])
  arrays, _ = tr.encode_pairs(pairs, sv, tv, max_source_len=12, max_target_len=7)
  boundaries = (3, 6, 9, 12)
  batches = tr.bucket_batches(arrays, 8, boundaries)

  def rows(source, source_len, target_out):
    return [(tuple(s[:n]), tuple(t)) for s, n, t in zip(source, source_len, target_out)]

  seen = []
  for b in batches:
    width = b["source"].shape[1]
    assert width in boundaries and b["source"].shape[0] == 8
    # The smallest bucket that fits: every real row is longer than the next smaller width.
    smaller = max([x for x in boundaries if x < width], default=0)
    v = b["valid"]
    assert np.all(b["source_len"] <= width) and np.all(b["source_len"][v] > smaller)
    seen += rows(b["source"][v], b["source_len"][v], b["target_out"][v])
  assert len({b["source"].shape for b in batches}) <= len(boundaries)
  assert sorted(seen) == sorted(rows(arrays["source"], arrays["source_len"], arrays["target_out"]))


def test_split_pairs_is_seeded_disjoint_and_checked():
  pairs = [([f"s{i}"], [f"t{i}"]) for i in range(40)]
  train, held_out = tr.split_pairs(pairs, 0.1, seed=3)
  assert len(held_out) == 4 and sorted(train + held_out) == sorted(pairs)
  assert tr.split_pairs(pairs, 0.1, seed=3) == (train, held_out)
  assert tr.split_pairs(pairs, 0.1, seed=4) != (train, held_out)
  with pytest.raises(ValueError, match="data.eval_fraction=1.0"):
    tr.split_pairs(pairs, 1.0, seed=3)


def test_saved_vocabularies_read_the_file_or_rebuild(tmp_path):
  pairs, _ = tr.generate_numbers(30, seed=1, max_digits=3)
  built = tr.build_vocabularies(pairs, size=0, seed=0)
  path = str(tmp_path / "vocab.json")
  assert tr.saved_vocabularies(path, lambda: built) == built  # missing: rebuilt
  tr.save_vocabularies(path, *built)
  assert tr.saved_vocabularies(path, lambda: pytest.fail("rebuilt")) == built


def test_make_data_buckets_the_held_out_pairs():
  train, held_out = tr.number_pairs(64, 20, seed=2, max_digits=5)
  kw = dict(vocab_size=0, vocab_seed=0, max_source_len=12, max_target_len=7, batch_size=8)
  data = tr.make_data(train, held_out, num_buckets=3, **kw)
  assert data.source_vocab == tr.build_vocabularies(train, size=0, seed=0)[0]
  assert data.train["source"].shape == (64, 12)
  assert data.eval_shapes == len({b["source"].shape for b in data.eval_batches}) > 1
  assert sum(int(b["valid"].sum()) for b in data.eval_batches) == 20
  with pytest.raises(ValueError, match="no held-out pair fits data.max_source_len"):
    tr.make_data(train, [(["one"] * 20, ["1"])], num_buckets=3, **kw)
