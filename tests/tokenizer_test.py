"""Tests for maskax.data.tokenizer: WordPiece training, the wrapper, the cache, vocab.txt."""

import json

import pytest
import tokenizers
from pydoc_data import topics

from maskax.data import corpus
from maskax.data import tokenizer as tk

VOCAB = 600


@pytest.fixture(scope="module")
def docs():
  # The pydoc topics: a slice of the embedded corpus that needs no stdlib parse.
  return [corpus.split_sentences(topics.topics[k]) for k in sorted(topics.topics)[:40]]


@pytest.fixture(scope="module")
def trained(docs):
  return tk.train_wordpiece(docs, VOCAB)


@pytest.fixture(scope="module")
def wrapped(trained):
  return tk.WordPieceTokenizer(trained)


def test_train_special_ids_and_size(trained, wrapped):
  assert isinstance(trained, tokenizers.Tokenizer)
  assert trained.get_vocab_size() == VOCAB == wrapped.vocab_size
  assert [trained.token_to_id(t) for t in tk.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert (wrapped.pad_id, wrapped.unk_id, wrapped.cls_id, wrapped.sep_id, wrapped.mask_id) == (
    0,
    1,
    2,
    3,
    4,
  )
  assert wrapped.special_ids == {0, 1, 2, 3, 4}


def test_encode_decode_and_subword_flags(wrapped):
  text = "The assert statement raises AssertionError when the expression is false."
  ids = wrapped.encode(text)
  assert wrapped.cls_id not in ids and wrapped.sep_id not in ids  # No specials added.
  assert wrapped.decode(ids) == text.lower().replace(" .", ".")
  pieces = [wrapped.id_to_token(i) for i in ids]
  assert any(p.startswith("##") for p in pieces)  # 'assertionerror' splits at vocab 600.
  assert [wrapped.is_subword(i) for i in ids] == [p.startswith("##") for p in pieces]
  flags = wrapped.subword_flags()
  assert flags.shape == (VOCAB,) and flags.sum() > 0
  assert all(flags[i] == wrapped.id_to_token(i).startswith("##") for i in range(VOCAB))
  assert wrapped.encode_batch([text, "x"]) == [ids, wrapped.encode("x")]
  # Special tokens written in text stay single tokens.
  assert wrapped.encode("a [MASK] b")[1] == wrapped.mask_id


def test_cased_training_keeps_case(docs):
  cased = tk.WordPieceTokenizer(tk.train_wordpiece(docs, VOCAB, lowercase=False))
  assert cased.decode(cased.encode("The Python")) == "The Python"


def test_too_small_vocab_rejected(docs):
  with pytest.raises(ValueError, match="vocab_size"):
    tk.train_wordpiece(docs, 5)


def _untrainable():
  raise AssertionError("load_or_train retrained instead of reusing the cache")
  yield  # unreachable; makes this a generator


def test_load_or_train_caches_and_reuses(tmp_path, docs):
  path = tmp_path / "sub" / "tokenizer.json"
  first = tk.load_or_train(path, docs, VOCAB)
  assert path.is_file()
  # WordPiece training is not deterministic across runs (huggingface/tokenizers#1794), so
  # reuse must read the file, never retrain: documents that cannot be read prove it.
  again = tk.load_or_train(path, _untrainable(), VOCAB)
  assert again.tokenizer.to_str() == first.tokenizer.to_str()
  assert again.vocab_size == VOCAB


def test_load_or_train_mismatch_is_error(tmp_path, docs):
  path = tmp_path / "tokenizer.json"
  tk.load_or_train(path, docs, VOCAB)
  with pytest.raises(ValueError, match=r"cache_path=.*vocab_size=600.*vocab_size=700"):
    tk.load_or_train(path, docs, 700)
  with pytest.raises(ValueError, match="lowercase"):
    tk.load_or_train(path, docs, VOCAB, lowercase=False)
  path.write_text("{not json", encoding="utf-8")
  with pytest.raises(ValueError, match="cache_path"):
    tk.load_or_train(path, docs, VOCAB)


def test_load_or_train_vocab_beyond_corpus(tmp_path):
  tiny = [["one two three."], ["four five six."]]
  with pytest.raises(ValueError, match="vocab_size=5000 is more than this corpus supports"):
    tk.load_or_train(tmp_path / "t.json", tiny, 5000)
  assert not (tmp_path / "t.json").exists()


def _write_vocab(path, tokens):
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return path


def test_from_vocab_txt_bert_layout(tmp_path):
  # Google's layout: [PAD] first, the other specials later with their own ids.
  tokens = ["[PAD]", "the", "cat", "##s", "sat", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "##at"]
  tok = tk.from_vocab_txt(_write_vocab(tmp_path / "vocab.txt", tokens))
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 5, 6, 7, 8)
  assert tok.vocab_size == len(tokens)
  assert tok.encode("The cats sat. Dog") == [1, 2, 3, 4, 9, 5]
  assert tok.is_subword(3) and not tok.is_subword(2)
  assert tok.encode("[MASK] cat") == [8, 2]
  assert json.loads(tok.tokenizer.to_str())["normalizer"]["lowercase"] is True


def test_from_vocab_txt_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    tk.from_vocab_txt(tmp_path / "missing.txt")
  no_mask = _write_vocab(tmp_path / "a.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "x"])
  with pytest.raises(ValueError, match=r"\[MASK\]"):
    tk.from_vocab_txt(no_mask)
  pad_late = _write_vocab(tmp_path / "b.txt", ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"])
  with pytest.raises(ValueError, match=r"\[PAD\] at id 1"):
    tk.from_vocab_txt(pad_late)
