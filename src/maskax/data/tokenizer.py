"""WordPiece tokenization for BERT: train with HF `tokenizers`, cache as JSON, or load a vocab.txt.

Special-token ids of a tokenizer trained here: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4
(trainer order). A user's vocab.txt keeps its own ids (Google's BERT files put [UNK]=100,
[CLS]=101, [SEP]=102, [MASK]=103) but must have [PAD] at id 0: the batches pad with 0 and unused
prediction slots hold id 0.
"""

import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
SUBWORD_PREFIX = "##"


def _bert_pipeline(model: models.Model, lowercase: bool) -> tokenizers.Tokenizer:
  """Wraps a WordPiece model in BERT's normalizer, pre-tokenizer, decoder and post-processor."""
  tok = tokenizers.Tokenizer(model)
  # strip_accents=None follows `lowercase`, as in BERT's uncased/cased models.
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix=SUBWORD_PREFIX)
  return tok


def _add_post_processor(tok: tokenizers.Tokenizer) -> None:
  """Lets the raw tokenizer add [CLS]/[SEP] like HF's BERT; our wrapper never asks it to."""
  tok.post_processor = processors.BertProcessing(
    (SEP, tok.token_to_id(SEP)), (CLS, tok.token_to_id(CLS))
  )


def train_wordpiece(
  documents: Iterable[list[str]], vocab_size: int, *, lowercase: bool = True
) -> tokenizers.Tokenizer:
  """Trains a BERT-style WordPiece tokenizer on documents (lists of sentences).

  The vocab holds at most `vocab_size` tokens, the five special tokens first ([PAD]=0 ...
  [MASK]=4); a corpus too small to reach `vocab_size` gives a smaller vocab.
  """
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(
      f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens"
    )
  tok = _bert_pipeline(
    models.WordPiece(unk_token=UNK, continuing_subword_prefix=SUBWORD_PREFIX), lowercase
  )
  trainer = trainers.WordPieceTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    show_progress=False,
    continuing_subword_prefix=SUBWORD_PREFIX,
  )
  tok.train_from_iterator((s for doc in documents for s in doc), trainer=trainer)
  _add_post_processor(tok)
  return tok


class WordPieceTokenizer:
  """Thin wrapper over a `tokenizers.Tokenizer` with the ids the BERT data pipeline needs."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(
        f"tokenizer lacks special tokens {missing}; its vocab must hold {SPECIAL_TOKENS}"
      )
    if ids[PAD] != 0:
      raise ValueError(
        f"tokenizer has [PAD] at id {ids[PAD]}; the data pipeline pads "
        "with id 0, so put [PAD] on the first line of vocab.txt"
      )
    self.pad_id, self.unk_id, self.cls_id = ids[PAD], ids[UNK], ids[CLS]
    self.sep_id, self.mask_id = ids[SEP], ids[MASK]
    self.special_ids = frozenset(ids.values())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    flags = np.zeros(self.vocab_size, dtype=bool)
    for token, i in vocab.items():
      flags[i] = token.startswith(SUBWORD_PREFIX)
    self._is_subword = flags

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without [CLS]/[SEP]."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts at once (parallel in Rust), without [CLS]/[SEP]."""
    return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Text of token ids, joining '##' pieces to their word."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> str:
    return self.tokenizer.id_to_token(int(token_id))

  def is_subword(self, token_id: int) -> bool:
    """True for a '##' continuation piece (it belongs to the previous token's word)."""
    return bool(self._is_subword[int(token_id)])

  def subword_flags(self) -> np.ndarray:
    """bool[V]: the '##' flag of every id, for vectorised whole-word grouping."""
    return self._is_subword.copy()

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer JSON atomically (other processes may be reading the same path)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    self.tokenizer.save(str(tmp))
    os.replace(tmp, path)


def _lowercases(tok: tokenizers.Tokenizer) -> bool:
  return bool(json.loads(tok.to_str())["normalizer"].get("lowercase", False))


def load_or_train(
  cache_path: str | os.PathLike,
  documents: Iterable[list[str]],
  vocab_size: int,
  *,
  lowercase: bool = True,
) -> WordPieceTokenizer:
  """Loads the tokenizer JSON at `cache_path`, or trains one on `documents` and saves it there.

  A cached tokenizer must match `vocab_size` and `lowercase`; training must reach `vocab_size`
  (so that the cache always equals the request). Either mismatch is a ValueError.
  """
  path = pathlib.Path(cache_path)
  if path.exists():
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
      raise ValueError(
        f"cache_path={str(path)!r} is not a tokenizer JSON ({e}); delete it to retrain"
      ) from None
    if tok.get_vocab_size() != vocab_size or _lowercases(tok) != lowercase:
      raise ValueError(
        f"cache_path={str(path)!r} holds a tokenizer with "
        f"vocab_size={tok.get_vocab_size()}, lowercase={_lowercases(tok)}, but "
        f"vocab_size={vocab_size}, lowercase={lowercase} was asked; delete the file to "
        "retrain or ask for the cached settings"
      )
    return WordPieceTokenizer(tok)
  tok = train_wordpiece(documents, vocab_size, lowercase=lowercase)
  if tok.get_vocab_size() != vocab_size:
    found = tok.get_vocab_size()
    raise ValueError(
      f"vocab_size={vocab_size} is more than this corpus supports (training "
      f"found {found} tokens); pass vocab_size<={found}"
    )
  wrapped = WordPieceTokenizer(tok)
  wrapped.save(path)
  return wrapped


def load(path: str | os.PathLike) -> WordPieceTokenizer:
  """The tokenizer JSON written by `WordPieceTokenizer.save` (a run keeps one in its workdir)."""
  try:
    return WordPieceTokenizer(tokenizers.Tokenizer.from_file(str(path)))
  except Exception as e:  # tokenizers raises plain Exception for unreadable JSON
    raise ValueError(f"path={str(path)!r} is not a tokenizer JSON ({e})") from None


def from_vocab_txt(path: str | os.PathLike, *, lowercase: bool = True) -> WordPieceTokenizer:
  """Loads a BERT vocab.txt (one token per line, line number = id) as a WordPiece tokenizer."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"path={str(path)!r} is not a file; pass a BERT vocab.txt")
  try:
    vocab = models.WordPiece.read_file(str(path))
  except Exception as e:
    raise ValueError(f"path={str(path)!r} is not a readable vocab.txt ({e})") from None
  if not vocab:
    raise ValueError(f"path={str(path)!r} holds no tokens; pass a BERT vocab.txt")
  model = models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=SUBWORD_PREFIX)
  tok = _bert_pipeline(model, lowercase)
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f"path={str(path)!r} lacks special tokens {missing}; add them to the vocab")
  tok.add_special_tokens(list(SPECIAL_TOKENS))  # Already in the vocab: keeps their ids.
  _add_post_processor(tok)
  return WordPieceTokenizer(tok)
