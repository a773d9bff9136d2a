"""Tokenised documents on disk: one shard file per slice of a corpus, read through a memory map.

A shard holds documents as sentences of token ids, laid out like Megatron's indexed datasets:

  tokens            u16[N_tok] (vocab <= 65536) or i32[N_tok]: every sentence's ids, back to back
  sentence_offsets  i64[N_sent + 1]: token offset where each sentence starts (last = N_tok)
  doc_offsets       i64[N_doc + 1]: sentence offset where each document starts (last = N_sent)
  doc_hashes        u64[N_doc]: 64-bit BLAKE2b of each document's text (picks the held-out set)

The tokens stream to disk as documents arrive; the offsets follow at the end, then a JSON footer
with every array's byte offset, the footer's length and a magic. A file cut short has no magic,
so it never reads as complete; on top of that the writer fills `NAME.tmp-PID` and renames it
only when finished (rename is atomic on POSIX).

Why not ArrayRecord through grain (both install and import here): on this 2-core CPU, reading
one random document of the 100 MB benchmark corpus takes 69 us through
`grain.python.ArrayRecordDataSource` (one record per document, group_size 1 as grain's random
access requires; 4.8 us each when 20,000 are fetched in one call) against 1.4 us from the memory
map, and the loader reads spans of random documents one at a time (NSP's random next segments,
sentence ranges), which a memory map gives without decoding whole records.
`python benchmarks/bert_data_bench.py --compare_arrayrecord` repeats the measurement.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import json
import mmap
import os
import pathlib
import struct

import numpy as np

FORMAT = "maskax-docs-v1"
# File names in a prepared folder, next to the shards.
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
MAGIC = b"MXDOCS01"
_TAIL = struct.Struct("<Q8s")  # footer length, magic
_ALIGN = 8


def token_dtype(vocab_size: int) -> np.dtype:
  """u16 when every id fits (BERT's 30,522 does): half the disk and page cache of i32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


class ShardWriter:
  """Streams documents into `path` (via a temporary name); `finish` makes the file appear."""

  def __init__(self, path: str | os.PathLike, dtype: np.dtype):
    self.path = pathlib.Path(path)
    self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
    self.dtype = np.dtype(dtype)
    self._file = open(self.tmp, "wb", buffering=1 << 20)
    # array('q') holds 8 bytes per entry: memory is bounded by the shard, not the corpus.
    self._sentences = array.array("q", [0])
    self._docs = array.array("q", [0])
    self._hashes = array.array("Q")
    self.num_tokens = 0

  @property
  def num_docs(self) -> int:
    return len(self._hashes)

  def add(self, sentences: list[list[int]], doc_hash: int) -> None:
    """Appends one document: its non-empty sentences' ids and the hash of its text."""
    lengths = [len(s) for s in sentences]
    ids = np.fromiter(itertools.chain.from_iterable(sentences), self.dtype, count=sum(lengths))
    self._file.write(ids.tobytes())
    for n in lengths:
      self.num_tokens += n
      self._sentences.append(self.num_tokens)
    self._docs.append(len(self._sentences) - 1)
    self._hashes.append(doc_hash)

  def finish(self) -> dict:
    """Writes offsets and footer, syncs, renames into place; returns the shard's counts."""
    arrays = {"tokens": (self.dtype.str, 0, self.num_tokens)}
    offset = self.num_tokens * self.dtype.itemsize
    for name, values, dtype in (
      ("sentence_offsets", self._sentences, "<i8"),
      ("doc_offsets", self._docs, "<i8"),
      ("doc_hashes", self._hashes, "<u8"),
    ):
      pad = -offset % _ALIGN
      self._file.write(b"\0" * pad)
      offset += pad
      arrays[name] = (dtype, offset, len(values))
      self._file.write(np.asarray(values, dtype).tobytes())
      offset += 8 * len(values)
    counts = dict(
      num_docs=self.num_docs, num_sentences=len(self._sentences) - 1, num_tokens=self.num_tokens
    )
    footer = json.dumps(dict(format=FORMAT, arrays=arrays, **counts)).encode()
    self._file.write(footer + _TAIL.pack(len(footer), MAGIC))
    self._file.flush()
    os.fsync(self._file.fileno())  # The rename must not land before the data does.
    self._file.close()
    os.replace(self.tmp, self.path)
    return dict(file=self.path.name, bytes=self.path.stat().st_size, **counts)

  def abort(self) -> None:
    """Closes and deletes the temporary file (an error stopped the shard)."""
    self._file.close()
    self.tmp.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Shard:
  """A shard's arrays, read-only views into one memory map (see the module docstring)."""

  tokens: np.ndarray
  sentence_offsets: np.ndarray
  doc_offsets: np.ndarray
  doc_hashes: np.ndarray

  @property
  def num_docs(self) -> int:
    return len(self.doc_hashes)

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)


def read_footer(path: str | os.PathLike) -> dict | None:
  """The footer of a finished shard, or None when the file is missing or incomplete."""
  try:
    with open(path, "rb") as f:
      size = f.seek(0, os.SEEK_END)
      if size < _TAIL.size:
        return None
      f.seek(size - _TAIL.size)
      length, magic = _TAIL.unpack(f.read(_TAIL.size))
      if magic != MAGIC or length > size - _TAIL.size:
        return None
      f.seek(size - _TAIL.size - length)
      footer = json.loads(f.read(length))
  except (OSError, ValueError):
    return None
  return footer if footer.get("format") == FORMAT else None


def open_shard(path: str | os.PathLike) -> Shard:
  """Memory-maps a finished shard; a ValueError naming the file when it is not one."""
  footer = read_footer(path)
  if footer is None:
    raise ValueError(
      f"{path} is not a finished {FORMAT} shard (missing, cut short or another "
      "format); re-run `python -m maskax.data.prepare` on its inputs"
    )
  with open(path, "rb") as f:
    # One map per file, every array a view into it: one file descriptor per shard.
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  views = {
    name: np.frombuffer(mapped, np.dtype(dtype), count, offset)
    for name, (dtype, offset, count) in footer["arrays"].items()
  }
  return Shard(**views)
