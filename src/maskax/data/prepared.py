"""A prepared corpus (the folder `maskax.data.prepare` writes), memory-mapped, by global ids.

Documents are numbered 0..D-1 in manifest order (input order), and token positions are global:
shard s's tokens start after all tokens of shards 0..s-1. Opening a corpus reads the manifest
and each shard's footer; tokens and offsets stay on disk (the page cache) until read.

`held_out` picks the held-out documents from a hash of their text, so the split is the same
whatever the training seed, the process count, or the number of workers and hosts that prepared
the data; duplicated documents always land on the same side.
"""

from __future__ import annotations

import bisect
import collections.abc
import itertools
import json
import pathlib

import numpy as np

from maskax.data import docfile, keyed_masks
from maskax.data import tokenizer as tokenizer_lib

MANIFEST, TOKENIZER = docfile.MANIFEST, docfile.TOKENIZER
_COUNT_CHUNK_DOCS = 4096


class PreparedDocs:
  """The documents of a prepared folder: token ids per sentence, read on demand."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    try:
      manifest = json.loads((self.path / MANIFEST).read_text())
    except FileNotFoundError:
      raise FileNotFoundError(
        f"{self.path / MANIFEST} is missing: prepare the corpus first (python -m "
        "maskax.data.prepare --input=... --output=DIR --vocab=...) and let every host finish"
      ) from None
    if manifest.get("format") != docfile.FORMAT:
      raise ValueError(
        f"{self.path / MANIFEST} has format {manifest.get('format')!r}, not "
        f"{docfile.FORMAT!r}; prepare the corpus again"
      )
    self.manifest = manifest
    self.shards = [docfile.open_shard(self.path / s["file"]) for s in manifest["shards"]]
    for shard, entry in zip(self.shards, manifest["shards"]):
      if (shard.num_docs, shard.num_tokens) != (entry["num_docs"], entry["num_tokens"]):
        raise ValueError(
          f"{self.path / entry['file']} does not match the manifest; prepare the corpus again"
        )
    # Python lists: bisect on them is ~5x faster than np.searchsorted for one scalar.
    self._doc_starts = np.cumsum([0] + [s.num_docs for s in self.shards]).tolist()
    self._token_starts = np.cumsum([0] + [s.num_tokens for s in self.shards]).tolist()
    self.num_documents = self._doc_starts[-1]
    self.num_tokens = self._token_starts[-1]
    self.fingerprint = manifest["fingerprint"]

  def tokenizer(self) -> tokenizer_lib.WordPieceTokenizer:
    """The tokenizer the corpus was prepared with (DIR/tokenizer.json)."""
    return tokenizer_lib.load(self.path / TOKENIZER)

  def doc_hashes(self) -> np.ndarray:
    """u64[D]: every document's text hash, in document order."""
    return np.concatenate([s.doc_hashes for s in self.shards])

  def _locate(self, doc: int) -> tuple[int, int]:
    s = bisect.bisect_right(self._doc_starts, doc) - 1
    return s, doc - self._doc_starts[s]

  def sentence_spans(self, doc: int) -> list[range]:
    """Document `doc` as one range of global token positions per sentence."""
    s, local = self._locate(doc)
    shard, base = self.shards[s], self._token_starts[s]
    lo, hi = shard.doc_offsets[local : local + 2].tolist()
    bounds = shard.sentence_offsets[lo : hi + 1].tolist()
    return [range(base + a, base + b) for a, b in itertools.pairwise(bounds)]

  def tokens(self, start: int, length: int) -> np.ndarray:
    """The ids at global positions [start, start + length), which lie in one document."""
    s = bisect.bisect_right(self._token_starts, start) - 1
    local = start - self._token_starts[s]
    return self.shards[s].tokens[local : local + length]

  def document_tokens(self, doc: int) -> np.ndarray:
    """Every id of document `doc` in one flat array (a view into the memory map)."""
    s, local = self._locate(doc)
    shard = self.shards[s]
    lo, hi = shard.doc_offsets[local : local + 2].tolist()
    start, stop = shard.sentence_offsets[[lo, hi]].tolist()
    return shard.tokens[start:stop]

  def document(self, doc: int) -> list[list[int]]:
    """Document `doc` as token ids per sentence (what `bert_data.tokenize_documents` returns)."""
    return [self.tokens(r.start, len(r)).tolist() for r in self.sentence_spans(doc)]

  def token_counts(self, docs: np.ndarray, vocab_size: int) -> np.ndarray:
    """i64[V]: how often each id occurs in the documents where `docs` (bool[D]) is True."""
    counts = np.zeros(vocab_size, np.int64)
    for s, shard in enumerate(self.shards):
      chosen = docs[self._doc_starts[s] : self._doc_starts[s + 1]]
      doc_tokens = shard.sentence_offsets[np.asarray(shard.doc_offsets)]  # i64[docs + 1]
      for lo in range(0, shard.num_docs, _COUNT_CHUNK_DOCS):  # Bounded memory per step.
        hi = min(lo + _COUNT_CHUNK_DOCS, shard.num_docs)
        per_token = np.repeat(chosen[lo:hi], np.diff(doc_tokens[lo : hi + 1]))
        ids = shard.tokens[doc_tokens[lo] : doc_tokens[hi]][per_token]
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def held_out(doc_hashes: np.ndarray, eval_fraction: float, split_seed: int) -> np.ndarray:
  """bool[D]: True for held-out documents, each with probability `eval_fraction`.

  A document is held out when a hash of (its text hash u64[D], split_seed) falls below the
  fraction: the expected count is D * eval_fraction (binomial, not rounded as
  `corpus.split_documents` does), and the choice does not depend on document order.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
  salt = keyed_masks.row_keys(np.uint64(split_seed), np.uint64(7))
  return keyed_masks.uniforms(doc_hashes ^ salt, 1, 0)[:, 0] < eval_fraction


class DocView(collections.abc.Sequence):
  """Documents `ids` (i[N]) of a corpus as lists of sentences of *global token positions*.

  This is the `docs` argument of `bert_data._document_pairs`, which only measures, joins and
  slices sentences: given positions instead of ids, it returns each pair's A and B as positions,
  each a contiguous span of one document (consecutive sentences, trimmed at either end), and
  draws exactly the random numbers it draws on ids, so pairs are google-research/bert's.
  """

  def __init__(self, docs: PreparedDocs, ids: np.ndarray):
    self.docs, self.ids = docs, ids

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> list[range]:
    return self.docs.sentence_spans(int(self.ids[i]))
