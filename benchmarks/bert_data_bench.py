"""BERT data at corpus scale: offline preparation and the streamed loader vs in-memory BertBatches.

Run: `python benchmarks/bert_data_bench.py` (corpora of 10 and 100 MB; `--sizes_mb=10,100,1000`
adds 1 GB) or `--quick` (a 2 MB corpus, seconds, for CI). Corpora are documents of the
embedded corpus (`corpus.load_documents()`: 2,349 documents, 1.65 MB) sampled with replacement
(seed 0) and written in google-research/bert's layout (a sentence per line, blank lines between
documents) into max(4, MB / 32) files of equal size; the vocabulary is WordPiece 8,000 trained
on the embedded corpus. Every measurement runs in a fresh process; peak RSS is `ru_maxrss` of
that process and the workers it waited for (the largest one, not a sum).
- prepare: `maskax.data.prepare.prepare` with 1 and 2 workers, each on one core (the
  tokenizer's threads off). MB/s of input text over wall time (worker start included); CPU s
  sums every process, so it shows the work whatever else runs on the machine.
- load: `shards.PreparedBatches`, seq 128, P 20, 32 rows per process, static and dynamic masks;
  sequences/s over `--batches` batches after the first, window planning included. "1 of 8"
  rows: process 0 of 8 (global batch 256), which plans the whole global batch for its 32 rows.
  RSS counts the corpus pages this process touched through its memory map: the "file" part
  of RSS at end (page cache, shared and reclaimable), apart from "anon" (its own memory).
- in-memory: `corpus.load_documents` + `BertBatches` (static, dupe 5, seq 128): build MB/s and
  peak RSS, then batches/s, for corpora up to `--memory_max_mb` (~115 MB of RAM per MB of text).
`--compare_arrayrecord` adds random document reads: memory map vs ArrayRecord via grain.
Measured numbers, with the machine, are in the README ("Benchmarks").
"""

import argparse
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SEQ_LEN, MAX_PREDICTIONS, ROWS = 128, 20, 32


def _usage() -> dict:
  """Peak RSS (this process or the largest waited-for child), CPU seconds of all, and this
  process's anonymous and file-backed RSS now (memory-mapped corpus pages are file-backed)."""
  own, children = (
    resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
  )
  with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f)
  return dict(
    rss_mb=max(own.ru_maxrss, children.ru_maxrss) / 1024,  # Linux reports KiB.
    cpu_s=own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
    anon_mb=int(status["RssAnon"].split()[0]) / 1024,
    file_mb=int(status["RssFile"].split()[0]) / 1024,
  )


def make_corpus(folder: pathlib.Path, megabytes: float, seed: int = 0) -> list[str]:
  """Writes ~`megabytes` of sampled embedded-corpus documents; returns the file paths."""
  from maskax.data import corpus

  docs = ["\n".join(d) for d in corpus.load_documents()]
  sizes = np.array([len(d.encode()) + 2 for d in docs])
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(docs), int(megabytes * 1e6 / sizes.mean() * 1.1) + 2)
  picks = picks[: max(2, np.searchsorted(np.cumsum(sizes[picks]), megabytes * 1e6))]
  num_files = max(4, math.ceil(megabytes / 32))
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for f in range(num_files):  # Round robin: files of equal size, so workers stay balanced.
    path = folder / f"part-{f:03d}.txt"
    with open(path, "w") as out:
      for i in picks[f::num_files]:
        out.write(docs[i] + "\n\n")
    paths.append(str(path))
  return paths


def _child_prepare(args) -> dict:
  from maskax.data import prepare

  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # One core per worker, in-process too.
  start = time.perf_counter()
  summary = prepare.prepare(args.inputs, args.out, args.vocab, num_workers=args.workers)
  seconds = time.perf_counter() - start
  return dict(seconds=seconds, mb_per_s=summary["input_bytes"] / 1e6 / seconds, **_usage())


def _child_load(args) -> dict:
  from maskax.data import shards

  count = args.processes
  start = time.perf_counter()
  it = shards.PreparedBatches(
    args.out,
    batch_size=ROWS * count,
    seq_len=SEQ_LEN,
    max_predictions=MAX_PREDICTIONS,
    masking=args.masking,
    process_count=count,
  )
  next(it)
  init = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  seconds = time.perf_counter() - start
  return dict(seconds=init + seconds, seq_per_s=args.batches * ROWS / seconds, **_usage())


def _child_memory(args) -> dict:
  from maskax.data import corpus, prepare
  from maskax.data.batching import BertBatches

  tok = prepare.load_vocab(args.vocab)
  start = time.perf_counter()
  docs = [d for path in args.inputs for d in corpus.load_documents(path)]
  it = BertBatches(
    docs,
    tok,
    batch_size=ROWS,
    seq_len=SEQ_LEN,
    max_predictions=MAX_PREDICTIONS,
    masking=args.masking,
  )
  build = time.perf_counter() - start
  text_mb = sum(os.path.getsize(p) for p in args.inputs) / 1e6
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  seconds = time.perf_counter() - start
  return dict(
    seconds=build, mb_per_s=text_mb / build, seq_per_s=args.batches * ROWS / seconds, **_usage()
  )


def _run_child(kind: str, **options) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), f"--child={kind}"]
  for key, value in options.items():
    for v in value if isinstance(value, list) else [value]:
      argv.append(f"--{key}={v}")
  proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ))
  if proc.returncode:
    raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_arrayrecord(folder: pathlib.Path, reads: int = 20_000) -> None:
  """Random single-document reads: memory map vs ArrayRecord (group_size 1) through grain."""
  try:
    import grain.python as grain
    from array_record.python import array_record_module
  except ImportError:
    print("--compare_arrayrecord: pip install array-record grain")
    return
  from maskax.data import prepared

  docs = prepared.PreparedDocs(folder)
  n = min(docs.num_documents, 50_000)
  path = str(folder.parent / "docs.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for d in range(n):
    writer.write(docs.document_tokens(d).tobytes())
  writer.close()
  source = grain.ArrayRecordDataSource([path])
  picks = np.random.default_rng(0).integers(0, n, reads).tolist()
  timings = {}
  start = time.perf_counter()
  for d in picks:
    np.frombuffer(source[d], docs.shards[0].tokens.dtype)
  timings["ArrayRecord via grain, one record"] = time.perf_counter() - start
  start = time.perf_counter()
  source.__getitems__(picks)
  timings["ArrayRecord via grain, all at once"] = time.perf_counter() - start
  start = time.perf_counter()
  for d in picks:
    np.asarray(docs.document_tokens(d))
  timings["memory map (PreparedDocs.document_tokens)"] = time.perf_counter() - start
  print("\n| random document read | us/document |\n|---|---|")
  for name, seconds in timings.items():
    print(f"| {name} | {seconds / reads * 1e6:.1f} |")


def _row(mb, path, step, how, result) -> str:
  cell = lambda key, fmt: format(result[key], fmt) if key in result else "-"
  anon = "-" if how.startswith("2") else f"{result['anon_mb']:,.0f} + {result['file_mb']:,.0f}"
  return (
    f"| {mb:g} | {path} | {step} | {how} | {cell('mb_per_s', '.2f')} | "
    f"{cell('seq_per_s', ',.0f')} | {result['rss_mb']:,.0f} | {anon} | "
    f"{result['seconds']:.1f} | {result['cpu_s']:.1f} |"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a 2 MB corpus, few batches")
  parser.add_argument("--sizes_mb", default="10,100")
  parser.add_argument("--memory_max_mb", type=float, default=10)
  parser.add_argument("--batches", type=int, default=1000)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--compare_arrayrecord", action="store_true")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  for name in ("inputs", "out", "vocab", "masking"):
    parser.add_argument(
      f"--{name}", action="append" if name == "inputs" else None, help=argparse.SUPPRESS
    )
  parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    children = dict(prepare=_child_prepare, load=_child_load, memory=_child_memory)
    print(json.dumps(children[args.child](args)))
    return
  sizes = [2.0] if args.quick else [float(s) for s in args.sizes_mb.split(",")]
  batches = 50 if args.quick else args.batches
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bert_data_bench-"))
  from maskax.data import corpus, tokenizer

  vocab = root / "tokenizer.json"
  if not vocab.exists():
    tokenizer.WordPieceTokenizer(tokenizer.train_wordpiece(corpus.load_documents(), 8000)).save(
      vocab
    )
  print(
    f"workdir {root}; {os.cpu_count()} CPUs; seq {SEQ_LEN}, {ROWS} rows per process",
    file=sys.stderr,
  )
  rows = []
  for mb in sizes:
    inputs = make_corpus(root / f"corpus-{mb:g}MB", mb)
    out = root / f"prepared-{mb:g}MB"
    for workers in (1, 2):
      result = _run_child(
        "prepare", inputs=inputs, out=f"{out}-{workers}w", vocab=str(vocab), workers=workers
      )
      rows.append(_row(mb, "prepared", "prepare", f"{workers} worker(s)", result))
      print(rows[-1], file=sys.stderr, flush=True)
    for masking, processes in (("static", 1), ("dynamic", 1), ("static", 8)):
      result = _run_child(
        "load", out=f"{out}-1w", masking=masking, processes=processes, batches=batches
      )
      how = masking + ("" if processes == 1 else f", 1 of {processes}")
      rows.append(_row(mb, "prepared", "load", how, result))
      print(rows[-1], file=sys.stderr, flush=True)
    if mb <= args.memory_max_mb:
      for masking in ("static", "dynamic"):
        result = _run_child(
          "memory", inputs=inputs, vocab=str(vocab), masking=masking, batches=batches
        )
        rows.append(_row(mb, "in-memory", "build + load", masking, result))
        print(rows[-1], file=sys.stderr, flush=True)
  print(
    "| corpus MB | path | step | how | prepare MB/s | seq/s per process | peak RSS MB | "
    "RSS at end MB: anon + file | wall s | CPU s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  if args.compare_arrayrecord:
    compare_arrayrecord(pathlib.Path(f"{root / f'prepared-{sizes[-1]:g}MB'}-1w"))


if __name__ == "__main__":
  main()
