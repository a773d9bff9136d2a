"""Offline BERT data preparation: text files -> tokenised document shards (`docfile`).

  python -m maskax.data.prepare --input='wiki/*.txt' --input=more.jsonl.gz --output=DIR \
      --vocab=vocab.txt [--num_workers=2] [--shard_index=0 --shard_count=1]

Inputs (`inputs`): files, folders, globs, `.gz`, google-research/bert's text layout or JSON
lines. `--vocab` is a BERT vocab.txt or a tokenizer JSON (`tokenizer.WordPieceTokenizer.save`).
Writes DIR/tokenizer.json, shards `docs-UUUUUU-PPPP.bin` of at most `docs_per_shard` documents
per work unit (a file, or 64 MB of a big one), a record `docs-UUUUUU.json` per unit, and, once
every unit is done, DIR/manifest.json, which is what `maskax.data.prepared` reads.

Split: unit i belongs to host i % shard_count, and each host's units go to `num_workers`
processes (one core each: the tokenizer's own threads are off in workers). Each worker streams
its unit, so memory is one tokenizer batch plus one shard's offsets, whatever the corpus size.
Documents keep input order (sorted paths, then position): the output does not depend on the
number of workers or hosts.

Idempotent: a unit whose record matches its input (path, byte range, size, mtime), the vocab and
the settings, and whose shards are all finished, is skipped; any other unit is redone from
scratch after its leftovers (temporary files of a killed run, stale shards) are deleted.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import time
from concurrent import futures

from maskax.data import docfile
from maskax.data import inputs as inputs_lib
from maskax.data import tokenizer as tokenizer_lib

MANIFEST, TOKENIZER = docfile.MANIFEST, docfile.TOKENIZER
# Sentences per tokenizer call: enough to amortise the call, a few MB of memory at most.
_BATCH_SENTENCES = 4096
_TOKENIZER_CACHE: dict = {}


def load_vocab(path: str, *, lowercase: bool = True) -> tokenizer_lib.WordPieceTokenizer:
  """A tokenizer JSON (by its .json name) or a BERT vocab.txt."""
  if str(path).endswith(".json"):
    return tokenizer_lib.load(path)
  return tokenizer_lib.from_vocab_txt(path, lowercase=lowercase)


def _write_json(path: pathlib.Path, value) -> None:
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
  os.replace(tmp, path)  # Atomic: readers (other hosts) see the old file or the new one.


def _unit_key(unit: inputs_lib.Unit) -> dict:
  st = os.stat(unit.path)
  return dict(
    path=os.path.abspath(unit.path),
    start=unit.start,
    end=unit.end,
    size=st.st_size,
    mtime_ns=st.st_mtime_ns,
  )


def _finished(out: pathlib.Path, index: int, expect: dict) -> dict | None:
  """The unit's record if it matches `expect` and all its shards are finished, else None."""
  try:
    record = json.loads((out / f"docs-{index:06d}.json").read_text())
  except (OSError, ValueError):
    return None
  if record.get("expect") != expect:
    return None
  for shard in record["shards"]:
    footer = docfile.read_footer(out / shard["file"])
    if footer is None or footer["num_tokens"] != shard["num_tokens"]:
      return None
  return record


def _tokenizer(out: pathlib.Path):
  if out not in _TOKENIZER_CACHE:
    _TOKENIZER_CACHE[out] = tokenizer_lib.load(out / TOKENIZER)
  return _TOKENIZER_CACHE[out]


def doc_hash(sentences: list[str]) -> int:
  """64 bits of BLAKE2b of the text: the held-out split then follows the text, not its order."""
  digest = hashlib.blake2b("\n".join(sentences).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def run_unit(job: tuple) -> dict:
  """Prepares one unit: `(out, index, unit, expect)` -> its record (also written as JSON)."""
  out, index, unit, expect = job
  for stale in glob.glob(str(out / f"docs-{index:06d}-*")) + glob.glob(
    str(out / f"docs-{index:06d}.json*")
  ):
    os.remove(stale)  # Leftovers of a killed or outdated run of this unit.
  tok = _tokenizer(out)
  dtype = docfile.token_dtype(tok.vocab_size)
  per_shard = expect["settings"]["docs_per_shard"]
  start, stats, shards, pending, writer = time.perf_counter(), {}, [], [], None

  def flush():
    nonlocal writer
    flat = [s for doc in pending for s in doc]
    encoded = iter(tok.tokenizer.encode_batch_fast(flat, add_special_tokens=False))
    for doc in pending:
      ids = [e.ids for e in (next(encoded) for _ in doc)]
      ids = [s for s in ids if s]  # As `bert_data.tokenize_documents`: empties dropped.
      if not ids:
        continue
      if writer is None:
        writer = docfile.ShardWriter(out / f"docs-{index:06d}-{len(shards):04d}.bin", dtype)
      writer.add(ids, doc_hash(doc))
      if writer.num_docs >= per_shard:
        shards.append(writer.finish())
        writer = None
    pending.clear()

  try:
    num_sentences = 0
    for doc in inputs_lib.documents(unit, json_field=expect["settings"]["json_field"], stats=stats):
      pending.append(doc)
      num_sentences += len(doc)
      if num_sentences >= _BATCH_SENTENCES:
        flush()
        num_sentences = 0
    flush()
    if writer is not None:
      shards.append(writer.finish())
      writer = None
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  num_docs = sum(s["num_docs"] for s in shards)
  if not num_docs and unit.end < 0:
    raise inputs_lib.InputError(
      f"{unit.path}: holds no text (whitespace or empty documents only); remove it or fix it"
    )
  record = dict(
    expect=expect,
    shards=shards,
    num_documents=num_docs,
    input_bytes=stats.get("bytes", 0),
    seconds=time.perf_counter() - start,
  )
  _write_json(out / f"docs-{index:06d}.json", record)
  return record


def _init_worker() -> None:
  # Parallelism comes from worker processes, one core each; the tokenizer's Rust thread pool
  # would oversubscribe the cores and make `num_workers` scaling meaningless.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_all(jobs: list, num_workers: int):
  """Yields unit records as units finish: in this process, or in `num_workers` processes."""
  if num_workers == 1 or len(jobs) <= 1:
    yield from map(run_unit, jobs)
    return
  # spawn: workers must not inherit a parent's JAX or tokenizer threads (fork is unsafe then).
  # An executor, unlike multiprocessing.Pool, notices a worker killed mid-unit and raises.
  context = multiprocessing.get_context("spawn")
  with futures.ProcessPoolExecutor(
    min(num_workers, len(jobs)), mp_context=context, initializer=_init_worker
  ) as pool:
    pending = [pool.submit(run_unit, job) for job in jobs]
    try:
      for future in futures.as_completed(pending):
        yield future.result()
    except futures.process.BrokenProcessPool:
      raise RuntimeError(
        "a preparation worker died (killed, or out of memory); finished units "
        "are kept: re-run the same command to resume"
      ) from None
    finally:
      for future in pending:
        future.cancel()  # After an error, units not started yet are dropped.


def _manifest(out: pathlib.Path, work: list, expects: list, tok) -> dict | None:
  """Writes manifest.json when every unit (of every host) is finished; else returns None."""
  records = [_finished(out, i, e) for i, e in enumerate(expects)]
  if any(r is None for r in records):
    return None
  per_file: dict[str, int] = {}
  for unit, record in zip(work, records):
    per_file[unit.path] = per_file.get(unit.path, 0) + record["num_documents"]
  empty = [p for p, n in per_file.items() if n == 0]
  if empty:
    raise inputs_lib.InputError(
      f"{empty[0]}: holds no text (whitespace or empty documents only); remove it or fix it"
    )
  shards = [s for r in records for s in r["shards"]]
  body = dict(
    format=docfile.FORMAT,
    vocab_sha256=expects[0]["vocab_sha256"],
    vocab_size=tok.vocab_size,
    settings=expects[0]["settings"],
    shards=shards,
  )
  manifest = dict(
    body,
    fingerprint=hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
    units=[r["expect"]["unit"] for r in records],
    num_documents=sum(s["num_docs"] for s in shards),
    num_sentences=sum(s["num_sentences"] for s in shards),
    num_tokens=sum(s["num_tokens"] for s in shards),
    input_bytes=sum(r["input_bytes"] for r in records),
  )
  for stale in glob.glob(str(out / "docs-*.json")):  # Units of an older, longer input list.
    if int(pathlib.Path(stale).stem[5:]) >= len(work):
      for f in glob.glob(stale[:-5] + "*"):
        os.remove(f)
  try:
    unchanged = json.loads((out / MANIFEST).read_text()) == manifest
  except (OSError, ValueError):
    unchanged = False
  if not unchanged:  # A re-run that changed nothing leaves every file untouched.
    _write_json(out / MANIFEST, manifest)
  return manifest


def prepare(
  inputs: list[str],
  output: str,
  vocab: str,
  *,
  num_workers: int = 1,
  shard_index: int = 0,
  shard_count: int = 1,
  docs_per_shard: int = 100_000,
  json_field: str = "text",
  split_mb: float = 64,
  lowercase: bool = True,
  log=None,
) -> dict:
  """Prepares this host's units of `inputs` into `output`; see the module docstring.

  Returns counts (units, done, skipped, input_bytes, seconds) and `manifest`: the manifest
  when every unit of every host is finished, else None (another host finishes it).
  """
  log = log or (lambda message: None)
  if num_workers < 1 or docs_per_shard < 1 or split_mb <= 0:
    raise ValueError(
      f"num_workers={num_workers}, docs_per_shard={docs_per_shard} and "
      f"split_mb={split_mb} must be positive"
    )
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  files = inputs_lib.expand(list(inputs))
  for path in files:
    inputs_lib.check(path)  # Fail before any work on a file that cannot be read.
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  tok = load_vocab(vocab, lowercase=lowercase)
  text = tok.tokenizer.to_str()
  if not (out / TOKENIZER).exists() or (out / TOKENIZER).read_text() != text:
    tmp = out / f"{TOKENIZER}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out / TOKENIZER)
  _TOKENIZER_CACHE.pop(out, None)
  settings = dict(json_field=json_field, docs_per_shard=docs_per_shard)
  common = dict(
    format=docfile.FORMAT, settings=settings, vocab_sha256=hashlib.sha256(text.encode()).hexdigest()
  )
  work = inputs_lib.units(files, int(split_mb * (1 << 20)))
  expects = [dict(common, unit=_unit_key(u)) for u in work]
  mine = range(shard_index, len(work), shard_count)
  todo = [i for i in mine if _finished(out, i, expects[i]) is None]
  if todo:
    (out / MANIFEST).unlink(missing_ok=True)  # It would describe data about to change.
  start, done_bytes = time.perf_counter(), 0
  jobs = [(out, i, work[i], expects[i]) for i in todo]
  for n, record in enumerate(_run_all(jobs, num_workers), 1):
    done_bytes += record["input_bytes"]
    u = record["expect"]["unit"]
    part = f" [{u['start']}:{u['end']}]" if u["end"] >= 0 else ""
    log(
      f"[{n}/{len(jobs)}] {u['path']}{part}: {record['num_documents']} documents, "
      f"{record['input_bytes'] / 1e6:.1f} MB in {record['seconds']:.1f} s"
    )
  manifest = _manifest(out, work, expects, tok)
  if manifest is None:
    log(
      f"this host's {len(mine)} units are done; the manifest is written by the host that "
      "finishes last"
    )
  return dict(
    units=len(work),
    mine=len(mine),
    done=len(todo),
    skipped=len(mine) - len(todo),
    input_bytes=done_bytes,
    seconds=time.perf_counter() - start,
    manifest=manifest,
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m maskax.data.prepare", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--input", action="append", required=True, help="file, folder or glob; repeat for more"
  )
  parser.add_argument("--output", required=True, help="folder of the prepared shards")
  parser.add_argument("--vocab", required=True, help="BERT vocab.txt or tokenizer JSON")
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--shard_index", type=int, default=0, help="this host's index")
  parser.add_argument("--shard_count", type=int, default=1, help="hosts sharing the corpus")
  parser.add_argument("--docs_per_shard", type=int, default=100_000)
  parser.add_argument("--json_field", default="text", help="text field of JSON lines inputs")
  parser.add_argument(
    "--split_mb",
    type=float,
    default=64,
    help="uncompressed files above this size are split into ranges",
  )
  parser.add_argument(
    "--lowercase",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="vocab.txt only: lowercase and strip accents (uncased BERT)",
  )
  args = parser.parse_args(argv)
  try:
    summary = prepare(
      args.input,
      args.output,
      args.vocab,
      num_workers=args.num_workers,
      shard_index=args.shard_index,
      shard_count=args.shard_count,
      docs_per_shard=args.docs_per_shard,
      json_field=args.json_field,
      split_mb=args.split_mb,
      lowercase=args.lowercase,
      log=lambda m: print(m, file=sys.stderr, flush=True),
    )
  except (ValueError, OSError, RuntimeError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  m = summary["manifest"]
  print(
    json.dumps(
      {k: v for k, v in summary.items() if k != "manifest"}
      | (
        {
          "fingerprint": m["fingerprint"],
          "num_documents": m["num_documents"],
          "num_tokens": m["num_tokens"],
        }
        if m
        else {}
      )
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
