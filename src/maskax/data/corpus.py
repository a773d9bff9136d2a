"""The embedded English corpus (text that ships with Python) and loaders for a user's own text.

The default corpus needs no download: the documentation topics in `pydoc_data.topics` (79 long
documents) plus the docstrings (over 200 characters) of the standard library's modules, classes
and functions, read with `ast` from the source files without importing them. On CPython 3.11.7
that is 79 + 2,270 = 2,349 documents, 1.7 M characters. The text varies a little between Python
versions, so `corpus_info` records the version next to the counts and a hash.

A document is a list of sentences (`list[str]`), the input format of BERT's NSP pairing.
"""

import ast
import functools
import hashlib
import os
import pathlib
import platform
import re
import sysconfig

import numpy as np

# Folders under the stdlib whose docstrings are test scaffolding, third-party code or GUI
# internals rather than library documentation.
_SKIP_DIRS = frozenset(
  {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)
_MIN_DOCSTRING_CHARS = 200
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# A sentence ends at . ! or ? followed by space and something that can start a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[*`])")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# reST underlines such as '*****' or '====' under headings carry no text.
_RULE_LINE = re.compile(r"^\s*([*=\-~^_#+])\1{2,}\s*$")
_HOW_TO_FIX = (
  "pass a UTF-8 text file (documents separated by blank lines), a folder of *.txt files "
  "(one document per file), or no path (`--config.data.path=''`) for the embedded corpus"
)


def _stdlib_sources() -> list[pathlib.Path]:
  """Lists the stdlib's .py files in sorted order, skipping tests, idlelib and site-packages."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
    found.extend(pathlib.Path(folder, f) for f in files if f.endswith(".py"))
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: str) -> list[str]:
  """Returns the docstrings of a module's module/class/function nodes, in source order."""
  tree = ast.parse(source)
  nodes = [n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED)]
  nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # ast.walk is breadth-first.
  texts = (ast.get_docstring(n, clean=True) for n in nodes)
  return [t for t in texts if t and len(t) > _MIN_DOCSTRING_CHARS]


# Cached because parsing ~670 stdlib files takes ~2 s and the result depends only on the
# running interpreter's installed files; nothing runs at import.
@functools.lru_cache(maxsize=1)
def _embedded_texts() -> tuple[tuple[str, ...], int]:
  """Returns (document texts, number of pydoc topics) of the embedded corpus."""
  from pydoc_data import topics  # Plain data module: a dict of str, no side effects.

  texts = [topics.topics[name] for name in sorted(topics.topics)]
  num_topics = len(texts)
  for path in _stdlib_sources():
    try:
      source = path.read_text(encoding="utf-8")
      texts.extend(_docstrings(source))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue  # A few stdlib files are deliberately invalid (e.g. lib2to3 fixtures).
  return tuple(texts), num_topics


def _read_utf8(path: pathlib.Path) -> str:
  """Reads a text file, rejecting binary (non-UTF-8 or NUL-containing) content by name."""
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
      f"path={str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
      f"convert it to UTF-8 or remove it: {_HOW_TO_FIX}"
    ) from None
  if "\x00" in text:
    raise ValueError(f"path={str(path)!r} contains NUL bytes, so it looks binary; {_HOW_TO_FIX}")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _user_texts(path: str | os.PathLike) -> tuple[list[str], bool]:
  """Returns (document texts, one_sentence_per_line) for a user file or folder."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"path={str(path)!r} does not exist; {_HOW_TO_FIX}")
  if p.is_dir():
    files = sorted(p.rglob("*.txt"))
    if not files:
      raise ValueError(f"path={str(path)!r} is a folder with no *.txt files; {_HOW_TO_FIX}")
    texts = [t for t in (_read_utf8(f) for f in files) if t.strip()]  # Empty files add nothing.
    lines_are_sentences = False
  else:
    texts = [t for t in _PARAGRAPH_BREAK.split(_read_utf8(p)) if t.strip()]
    lines_are_sentences = True  # BERT's input format: one sentence per line.
  if not texts:
    raise ValueError(f"path={str(path)!r} holds no text (empty or whitespace only); {_HOW_TO_FIX}")
  return texts, lines_are_sentences


def _split_prose(line: str) -> list[str]:
  return [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]


def split_sentences(text: str, *, lines_are_sentences: bool = False) -> list[str]:
  """Splits text into sentences: crude, punctuation-based, dropping empty and rule lines.

  Paragraphs (separated by blank lines) are joined and split after `.`, `!` or `?`; an
  indented paragraph (code, grammar) keeps one line per sentence. With
  `lines_are_sentences=True` every line is a hard boundary (BERT's one-sentence-per-line files).
  """
  sentences = []
  for paragraph in _PARAGRAPH_BREAK.split(text):
    lines = [ln for ln in paragraph.split("\n") if ln.strip() and not _RULE_LINE.match(ln)]
    if not lines:
      continue
    if lines_are_sentences:
      sentences.extend(s for ln in lines for s in _split_prose(ln.strip()))
    elif all(ln[:1] in (" ", "\t") for ln in lines):
      sentences.extend(ln.strip() for ln in lines)
    else:
      sentences.extend(_split_prose(" ".join(ln.strip() for ln in lines)))
  return sentences


def _texts(path) -> tuple[list[str], bool]:
  if path is None:
    return list(_embedded_texts()[0]), False
  return _user_texts(path)


def load_documents(path: str | os.PathLike | None = None) -> list[list[str]]:
  """Loads documents as lists of sentences: the embedded corpus, a user file or a folder.

  `path=None`: the embedded corpus (pydoc topics, then stdlib docstrings in sorted file order).
  A file: documents are separated by blank lines, each line is split into sentences. A folder:
  one document per `*.txt` file (recursive, sorted by path; empty files skipped). Documents
  that split into no sentences are dropped.
  """
  texts, by_line = _texts(path)
  docs = [split_sentences(t, lines_are_sentences=by_line) for t in texts]
  return [d for d in docs if d]


def load_text(path: str | os.PathLike | None = None) -> str:
  """Returns the whole corpus as one string (documents joined by a blank line), for a char-RNN."""
  texts = _texts(path)[0]
  return "\n\n".join(t.strip("\n") for t in texts)


def corpus_info(path: str | os.PathLike | None = None) -> dict:
  """Describes a corpus for the run's record: source, Python version, counts and a SHA-256."""
  texts, by_line = _texts(path)
  docs = [d for d in (split_sentences(t, lines_are_sentences=by_line) for t in texts) if d]
  info = {
    "source": "embedded" if path is None else str(path),
    "python_version": platform.python_version(),
    "python_implementation": platform.python_implementation(),
    "num_documents": len(docs),
    "num_sentences": sum(len(d) for d in docs),
    "num_chars": sum(len(t) for t in texts),
    "sha256": hashlib.sha256("\n\n".join(texts).encode("utf-8")).hexdigest(),
  }
  if path is None:
    num_topics = _embedded_texts()[1]
    info.update(
      num_pydoc_topics=num_topics,
      num_docstrings=len(texts) - num_topics,
      min_docstring_chars=_MIN_DOCSTRING_CHARS,
    )
  return info


def split_documents(documents: list, eval_fraction: float, seed: int) -> tuple[list, list]:
  """Splits documents into (train, eval) by whole documents, deterministically from `seed`.

  `round(len(documents) * eval_fraction)` documents (at least 1 when the fraction is positive)
  go to eval; both parts keep the original document order.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
  n = len(documents)
  num_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
  if num_eval >= n:
    raise ValueError(
      f"eval_fraction={eval_fraction} leaves no training documents out of {n}; "
      "lower eval_fraction or add documents"
    )
  is_eval = np.zeros(n, dtype=bool)
  is_eval[np.random.default_rng(seed).permutation(n)[:num_eval]] = True
  train = [d for d, e in zip(documents, is_eval) if not e]
  held_out = [d for d, e in zip(documents, is_eval) if e]
  return train, held_out
