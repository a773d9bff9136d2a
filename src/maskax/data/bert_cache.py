"""BERT data for a run: every corpus prepared once into a shared cache, then read from shards.

One path (issue 16): the embedded corpus (`data.path=''`) and a user's raw text (a file, folder,
glob, `.gz` or JSON lines with a "text" field; `maskax.data.inputs`) are prepared by
`maskax.data.prepare` into CACHE/bert/prepared-KEY and read by `shards.PreparedBatches`. A
`data.path` that already is a prepared folder (it holds manifest.json) is read as it is.

CACHE is `data.cache_dir`, else $MASKAX_CACHE, else ~/.cache/maskax. KEY hashes
- the inputs: each file's absolute path, size and mtime (`stat` only: a 100 GB corpus is not
  read to be recognised), or, for the embedded corpus, the content of the files it is extracted
  from (the stdlib sources, pydoc topics, corpus.py) and the Python version;
- the vocabulary (its tokenizer JSON) and the preparation settings.
A changed input file prepares anew into another folder; old folders stay until the cache is
deleted. The embedded corpus is first written out as one text file in google-research/bert's
layout (CACHE/bert/embedded-KEY.txt, 1.8 MB), so it takes the same path as a user's text.

Vocabulary: `data.vocab_file` (a BERT vocab.txt), else `model.init_from`'s vocab.txt, else the
run's own WORKDIR/tokenizer.json (a resumed run keeps its vocabulary), else WordPiece trained
on a sample of the corpus: about `data.vocab_sample_mb` MB of text from the start of the input
files, shared among them in proportion to their sizes, held-out documents left out. HF
tokenizers' WordPiece training is not reproducible (tokenizers#1794), so it is trained once per
(inputs, vocab_size, sample size, held-out split) and cached as CACHE/bert/wordpiece-KEY.json:
every run of a sweep, every resume and every process sees the same vocabulary.

Processes: process 0 writes the cache under a file lock (a second run on the host waits for the
first instead of preparing the same folder twice); the other processes wait, at most
`data.prepare_wait_s`, for the files process 0 writes, so with several hosts the cache must be
on a file system they all read (or prepare the corpus offline and pass its folder as data.path).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import pathlib
import platform
import time
from collections.abc import Iterator

import numpy as np
from absl import logging

from maskax.data import corpus, docfile, prepare, prepared, shards
from maskax.data import inputs as inputs_lib
from maskax.data import tokenizer as tokenizer_lib

CACHE_ENV = "MASKAX_CACHE"
# Sample documents are split into held-out and training ones this many at a time.
_SAMPLE_CHUNK_DOCS = 1024


def cache_root(cache_dir: str = "") -> pathlib.Path:
  """`cache_dir`, else $MASKAX_CACHE, else ~/.cache/maskax."""
  root = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/maskax"
  return pathlib.Path(root).expanduser()


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def input_fingerprint(path: str) -> dict:
  """What identifies the inputs of `data.path` ('' = the embedded corpus) without reading them
  (the embedded corpus's sources are hashed: 11 MB, about 0.2 s)."""
  if path:
    files = inputs_lib.expand([path])
    return {"files": [[os.path.abspath(f), *_size_mtime(f)] for f in files]}
  from pydoc_data import topics  # A data module: a dict of str, no side effects.

  digest = hashlib.sha256()
  for source in [corpus.__file__, topics.__file__, *corpus._stdlib_sources()]:
    digest.update(f"{source}\0".encode())
    digest.update(pathlib.Path(source).read_bytes())
  return {"embedded": digest.hexdigest(), "python": platform.python_version()}


def _size_mtime(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def write_embedded_corpus(path: pathlib.Path) -> None:
  """The embedded corpus as one text file: a sentence per line, a blank line between documents.

  Read back, a line is split again after `.`, `!` or `?` (`inputs.documents`): only the code
  lines of a few docstrings, kept whole by `corpus.split_sentences`, become two sentences.
  """
  docs = corpus.load_documents(None)
  _write_text_atomic(path, "\n\n".join("\n".join(doc) for doc in docs) + "\n")


def vocab_sample(
  files: list[str], sample_mb: float, *, eval_fraction: float, split_seed: int
) -> Iterator[list[str]]:
  """Documents (lists of sentences) to train WordPiece on: the first documents of each file up
  to its share of `sample_mb` MB of text (in proportion to the file's size on disk), without the
  ones `prepared.held_out` keeps for evaluation. Streams: memory is one chunk of documents."""
  sizes = [max(os.path.getsize(f), 1) for f in files]
  for path, size in zip(files, sizes):
    budget, used = sample_mb * 1e6 * size / sum(sizes), 0
    docs = inputs_lib.documents(inputs_lib.Unit(path))
    while used < budget:
      chunk = list(itertools.islice(docs, _SAMPLE_CHUNK_DOCS))
      if not chunk:
        break
      taken = []
      for doc in chunk:
        taken.append(doc)
        used += sum(len(s) + 1 for s in doc)
        if used >= budget:
          break
      hashes = np.array([prepare.doc_hash(d) for d in taken], np.uint64)
      keep = ~prepared.held_out(hashes, eval_fraction, split_seed)
      yield from (d for d, k in zip(taken, keep) if k)


@contextlib.contextmanager
def _locked(path: pathlib.Path, wait_s: float):
  """An exclusive `flock` on `path` (released when this process ends, even when killed)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    deadline, told = time.monotonic() + wait_s, False
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise RuntimeError(
            f"another process held {path} for over data.prepare_wait_s={wait_s:g} s while "
            "preparing the same data; wait for it to finish or raise data.prepare_wait_s"
          ) from None
        if not told:
          logging.info("another run is preparing the same data (%s); waiting for it", path)
          told = True
        time.sleep(0.5)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _wait_for(path: pathlib.Path, wait_s: float, root: pathlib.Path) -> None:
  deadline = time.monotonic() + wait_s
  while not path.exists():
    if time.monotonic() > deadline:
      raise RuntimeError(
        f"{path} did not appear within data.prepare_wait_s={wait_s:g} s: process 0 writes it; "
        f"check its log, and that data.cache_dir={str(root)!r} is a folder every process reads"
      )
    time.sleep(1.0)


def _given_vocab(config) -> str:
  if config.data.vocab_file:
    return config.data.vocab_file
  return os.path.join(config.model.init_from, "vocab.txt") if config.model.init_from else ""


def prepared_folder(config, workdir: str, *, process_index: int = 0) -> pathlib.Path:
  """The prepared folder of the run's corpus, preparing it (process 0) or waiting for it."""
  d = config.data
  if d.path and (pathlib.Path(d.path) / docfile.MANIFEST).exists():
    folder = pathlib.Path(d.path)
    vocab = _given_vocab(config)
    if vocab:  # The ids of the prepared tokens must be the checkpoint's / the file's.
      mine = prepare.load_vocab(vocab).tokenizer.get_vocab()
      if mine != tokenizer_lib.load(folder / docfile.TOKENIZER).tokenizer.get_vocab():
        raise ValueError(
          f"data.path={d.path!r} was prepared with another vocabulary than {vocab}; "
          "prepare it again with --vocab=" + vocab
        )
    return folder
  root, wait_s, writer = cache_root(d.cache_dir), d.prepare_wait_s, process_index == 0
  try:
    fingerprint = input_fingerprint(d.path)
  except inputs_lib.InputError as e:
    raise inputs_lib.InputError(f"data.path={d.path!r}: {e}") from None
  inputs_key = _digest(fingerprint)
  files = [f for f, *_ in fingerprint.get("files", [])]
  if not d.path:
    files = [str(root / "bert" / f"embedded-{inputs_key}.txt")]
  vocab = _given_vocab(config)
  if not vocab and os.path.exists(os.path.join(workdir, docfile.TOKENIZER)):
    vocab = os.path.join(workdir, docfile.TOKENIZER)  # A resumed run keeps its vocabulary.
  trained = not vocab
  if trained:
    split = dict(eval_fraction=d.eval_fraction, split_seed=d.seed)
    key = _digest([inputs_key, d.vocab_size, d.vocab_sample_mb, split])
    vocab = str(root / "bert" / f"wordpiece-{key}.json")
  with contextlib.ExitStack() as stack:
    if writer:
      stack.enter_context(_locked(root / "bert" / f"{inputs_key}.lock", wait_s))
      if not d.path and not os.path.exists(files[0]):
        write_embedded_corpus(pathlib.Path(files[0]))
      if trained and not os.path.exists(vocab):
        logging.info("training WordPiece (%d tokens) on a sample of the corpus", d.vocab_size)
        sample = vocab_sample(files, d.vocab_sample_mb, **split)
        tokenizer_lib.load_or_train(vocab, sample, d.vocab_size)
    else:
      _wait_for(pathlib.Path(vocab), wait_s, root)
    text = prepare.load_vocab(vocab).tokenizer.to_str()
    settings = dict(format=docfile.FORMAT, vocab=hashlib.sha256(text.encode()).hexdigest())
    folder = root / "bert" / f"prepared-{_digest([inputs_key, settings])}"
    if not writer:
      _wait_for(folder / docfile.MANIFEST, wait_s, root)
    elif not (folder / docfile.MANIFEST).exists():
      logging.info("preparing %s into %s", d.path or "the embedded corpus", folder)
      workers = d.prepare_workers or os.cpu_count() or 1
      prepare.prepare(files, str(folder), vocab, num_workers=workers, log=logging.info)
  return folder


def for_config(config, workdir: str, *, process_index: int = 0, process_count: int = 1):
  """(tokenizer, training batches, fixed held-out batches) of a BERT pretraining config.

  Training: `shards.PreparedBatches` of the training split, seeded by `seed`, this process's
  rows. Held out: the first `data.eval_batches` batches of the documents the split keeps for
  evaluation (by a hash of their text and `data.seed`), with static masks fixed by `data.seed`:
  the same for every training seed and process count. Process 0 keeps the tokenizer in
  WORKDIR/tokenizer.json, which `run_tokenizer` reads back to use the trained model.
  """
  d = config.data
  docs = prepared.PreparedDocs(prepared_folder(config, workdir, process_index=process_index))
  tok = docs.tokenizer()
  own = pathlib.Path(workdir) / docfile.TOKENIZER
  text = tok.tokenizer.to_str()
  if process_index == 0 and (
    not own.exists() or tokenizer_lib.load(own).tokenizer.to_str() != text
  ):
    tok.save(own)
  common = dict(
    batch_size=config.train.batch_size,
    seq_len=d.seq_len,
    max_predictions=d.max_predictions,
    masked_lm_prob=d.masked_lm_prob,
    short_seq_prob=d.short_seq_prob,
    eval_fraction=d.eval_fraction,
    split_seed=d.seed,
    max_documents=d.max_documents,
    process_index=process_index,
    process_count=process_count,
  )
  train_data = shards.PreparedBatches(
    docs,
    split="train",
    masking=d.masking,
    seed=config.seed,
    whole_word_masking=d.whole_word_masking,
    **common,
  )
  try:
    held_out = shards.PreparedBatches(
      docs, split="eval", masking="static", seed=d.seed, dupe_factor=1, num_epochs=1, **common
    )
  except ValueError as e:
    raise ValueError(f"the held-out split is too small ({e}); raise data.eval_fraction") from None
  eval_batches = list(itertools.islice(held_out, d.eval_batches))
  return tok, train_data, eval_batches


def run_tokenizer(workdir: str, vocab_file: str = "") -> tokenizer_lib.WordPieceTokenizer:
  """The tokenizer a run trained with: WORKDIR/tokenizer.json, else `vocab_file` (runs from
  before the workdir kept one)."""
  path = os.path.join(workdir, docfile.TOKENIZER)
  if os.path.exists(path):
    return tokenizer_lib.load(path)
  if vocab_file:
    return tokenizer_lib.from_vocab_txt(vocab_file)
  raise FileNotFoundError(f"{path} is missing: the run's tokenizer is needed to read input.")
