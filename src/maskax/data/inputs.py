"""Input text for offline preparation: file lists, up-front checks and streamed documents.

Two layouts, chosen by file name (a trailing `.gz` is decompressed on the fly):
- text (any other name): google-research/bert's layout, one sentence per line and a blank line
  between documents; each line is further split after `.`, `!` or `?` like `corpus.load_documents`
  does for a file, so a prepared file holds exactly the documents the in-memory path reads.
- JSON lines (`.jsonl`, `.json`, `.ndjson`): one object per line, its `json_field` a document's
  whole text, split into sentences as prose (`corpus.split_sentences`).

Big uncompressed files are cut into byte ranges (`Unit`s) so that several workers share them;
a range boundary moves forward to just after a blank line (a line end for JSON lines), which
both neighbouring ranges compute alike, so every document is read exactly once.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import json
import os
import pathlib
import zlib
from collections.abc import Iterator

from maskax.data import corpus

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_SNIFF_BYTES = 1 << 16


class InputError(ValueError):
  """A one-line problem with one input file; the message starts with the file's path."""


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of work: bytes [start, end) of `path` (the whole file when `end` is -1)."""

  path: str
  start: int = 0
  end: int = -1

  @property
  def is_json(self) -> bool:
    return is_json_lines(self.path)


def is_json_lines(path: str) -> bool:
  name = path.removesuffix(".gz")
  return name.endswith(JSON_SUFFIXES)


def expand(patterns: list[str]) -> list[str]:
  """Sorted unique files named by paths, folders (recursive, hidden files skipped) and globs."""
  found = set()
  for pattern in patterns:
    p = pathlib.Path(pattern)
    if p.is_dir():
      matched = [
        str(f)
        for f in p.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
      ]
    elif p.is_file():
      matched = [pattern]
    else:
      matched = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    if not matched:
      raise InputError(
        f"{pattern}: matches no file (pass files, folders or globs of text, .gz or .jsonl files)"
      )
    found.update(matched)
  return sorted(found)


def _open(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def check(path: str) -> None:
  """Raises InputError when `path` is empty, binary, not UTF-8 or a broken gzip (first 64 KiB)."""
  try:
    with _open(path) as f:
      head = f.read(_SNIFF_BYTES)
  except (OSError, EOFError, zlib.error) as e:
    raise InputError(
      f"{path}: cannot be read as {'gzip' if path.endswith('.gz') else 'a file'} ({e})"
    ) from None
  if not head:
    raise InputError(f"{path}: is empty; remove it or pass a file with text")
  nul = head.find(b"\0")
  if nul >= 0:
    raise InputError(f"{path}: is binary (a NUL byte at offset {nul}); pass UTF-8 text")
  try:  # Incremental: a character cut by the 64 KiB limit is not an error.
    codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
  except UnicodeDecodeError as e:
    raise InputError(
      f"{path}: is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
      "(e.g. `iconv -t utf-8`)"
    ) from None


def units(files: list[str], split_bytes: int) -> list[Unit]:
  """Work units: whole files, or byte ranges of `split_bytes` for big uncompressed ones."""
  out = []
  for path in files:
    size = os.path.getsize(path)
    if path.endswith(".gz") or size <= split_bytes:
      out.append(Unit(path))
    else:
      out.extend(Unit(path, s, min(s + split_bytes, size)) for s in range(0, size, split_bytes))
  return out


def _boundary(f, nominal: int, size: int, is_json: bool) -> int:
  """First document start at or after `nominal`: after a blank line (JSON lines: a line end)."""
  if nominal <= 0 or nominal >= size:
    return min(max(nominal, 0), size)
  f.seek(nominal - 1)
  pos = nominal - 1 + len(f.readline())  # The start of the first line at or after `nominal`.
  if is_json:
    return pos
  for line in iter(f.readline, b""):
    pos += len(line)
    if not line.strip():
      return pos
  return size


def _lines(unit: Unit, stats: dict) -> Iterator[tuple[int, str]]:
  """(byte offset, decoded line) over the unit; `stats['bytes']` counts what was read."""
  with _open(unit.path) as f:
    pos, stop = 0, None
    if unit.end >= 0:
      size = os.path.getsize(unit.path)
      pos = _boundary(f, unit.start, size, unit.is_json)
      stop = _boundary(f, unit.end, size, unit.is_json)
      f.seek(pos)
    try:
      for raw in f:
        if stop is not None and pos >= stop:
          break
        if b"\0" in raw:
          raise InputError(f"{unit.path}: is binary (a NUL byte near byte {pos}); pass UTF-8 text")
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise InputError(
            f"{unit.path}: is not UTF-8 text ({e.reason} at byte "
            f"{pos + e.start}); convert it (e.g. `iconv -t utf-8`)"
          ) from None
        yield pos, line
        pos += len(raw)
        stats["bytes"] = stats.get("bytes", 0) + len(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
      raise InputError(f"{unit.path}: broken gzip stream near byte {pos} ({e})") from None


def _json_text(unit: Unit, pos: int, line: str, field: str) -> str:
  try:
    record = json.loads(line)
  except ValueError as e:
    raise InputError(f"{unit.path}: line at byte {pos} is not JSON ({e})") from None
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    raise InputError(
      f"{unit.path}: line at byte {pos} has no string field {field!r}; pass --json_field=NAME"
    )
  return record[field]


def documents(
  unit: Unit, *, json_field: str = "text", stats: dict | None = None
) -> Iterator[list[str]]:
  """Streams the unit's documents as lists of sentences; documents without text are skipped."""
  stats = {} if stats is None else stats
  if unit.is_json:
    for pos, line in _lines(unit, stats):
      if line.strip():
        doc = corpus.split_sentences(_json_text(unit, pos, line, json_field))
        if doc:
          yield doc
    return
  lines = []
  for _, line in _lines(unit, stats):
    if line.strip():
      lines.append(line.rstrip("\r\n"))
    elif lines:
      doc = corpus.split_sentences("\n".join(lines), lines_are_sentences=True)
      lines = []
      if doc:
        yield doc
  if lines:
    doc = corpus.split_sentences("\n".join(lines), lines_are_sentences=True)
    if doc:
      yield doc
