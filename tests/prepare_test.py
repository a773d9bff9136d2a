"""Tests for maskax.data.prepare (offline preparation) and the shards it writes (CPU, tiny corpora).

The reference is the in-memory path: `bert_data.tokenize_documents(corpus.load_documents(file))`.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pydoc_data import topics

import numpy as np
import pytest

from maskax.data import bert_data, corpus, docfile, prepare, prepared
from maskax.data import tokenizer as tk


def _documents():
  return [d for d in (corpus.split_sentences(topics.topics[k]) for k in sorted(topics.topics)) if d]


def _write_bert_layout(path, docs):
  """google-research/bert's layout: one sentence per line, a blank line between documents."""
  path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "tokenizer.json"
  tk.WordPieceTokenizer(tk.train_wordpiece(_documents(), 800)).save(path)
  return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  return _write_bert_layout(tmp_path_factory.mktemp("text") / "corpus.txt", _documents())


@pytest.fixture(scope="module")
def reference(text_file, vocab):
  """Token ids per sentence per document, as the in-memory path reads the same file."""
  return bert_data.tokenize_documents(corpus.load_documents(text_file), tk.load(vocab))


def _read_all(folder) -> list:
  docs = prepared.PreparedDocs(folder)
  return [docs.document(i) for i in range(docs.num_documents)]


def _shard_bytes(folder) -> dict:
  return {
    f: open(os.path.join(folder, f), "rb").read()
    for f in sorted(os.listdir(folder))
    if f.endswith(".bin")
  }


def test_documents_equal_the_in_memory_path(tmp_path, text_file, vocab, reference):
  out = tmp_path / "out"
  summary = prepare.prepare([text_file], out, vocab, docs_per_shard=20)
  manifest = summary["manifest"]
  assert manifest["num_documents"] == len(reference) and len(manifest["shards"]) > 1
  assert _read_all(out) == reference
  # A gzip of the same text gives the same shards.
  gz = tmp_path / "corpus.txt.gz"
  with open(text_file, "rb") as f:
    gz.write_bytes(gzip.compress(f.read()))
  again = prepare.prepare([str(gz)], tmp_path / "gz", vocab, docs_per_shard=20)["manifest"]
  assert again["fingerprint"] == manifest["fingerprint"]


def test_json_lines(tmp_path, vocab):
  texts = [topics.topics[k] for k in sorted(topics.topics)[:12]]
  path = tmp_path / "docs.jsonl.gz"
  with gzip.open(path, "wt") as f:
    for text in texts:
      f.write(json.dumps({"id": 1, "body": text}) + "\n\n")  # Blank lines are skipped.
  prepare.prepare([str(path)], tmp_path / "out", vocab, json_field="body")
  expected = bert_data.tokenize_documents(
    [corpus.split_sentences(t) for t in texts], tk.load(vocab)
  )
  assert _read_all(tmp_path / "out") == expected
  with pytest.raises(ValueError, match=r"docs\.jsonl\.gz.*'text'"):
    prepare.prepare([str(path)], tmp_path / "bad", vocab)


def test_same_data_whatever_workers_hosts_and_file_splits(tmp_path, text_file, vocab, reference):
  one = prepare.prepare([text_file], tmp_path / "one", vocab, split_mb=0.04)["manifest"]
  assert len(one["units"]) >= 5  # 0.47 MB in 40 KB ranges, cut at document boundaries.
  assert _read_all(tmp_path / "one") == reference
  two = prepare.prepare([text_file], tmp_path / "two", vocab, split_mb=0.04, num_workers=2)
  assert two["manifest"]["fingerprint"] == one["fingerprint"]
  assert _shard_bytes(tmp_path / "two") == _shard_bytes(tmp_path / "one")
  hosts = [
    prepare.prepare(
      [text_file], tmp_path / "hosts", vocab, split_mb=0.04, shard_index=i, shard_count=2
    )
    for i in (0, 1)
  ]
  assert hosts[0]["manifest"] is None  # Host 1 still had units to do.
  assert hosts[1]["manifest"]["fingerprint"] == one["fingerprint"]
  # The same documents split over files in a folder, read through a glob and a folder.
  docs = _documents()
  (tmp_path / "parts").mkdir()
  for i, lo in enumerate(range(0, len(docs), 20)):
    _write_bert_layout(tmp_path / "parts" / f"part{i:02d}.txt", docs[lo : lo + 20])
  (tmp_path / "parts" / ".hidden").write_bytes(b"\0")  # Hidden files are not inputs.
  for inputs in ([str(tmp_path / "parts")], [str(tmp_path / "parts" / "part*.txt")]):
    prepare.prepare(inputs, tmp_path / "folder", vocab, num_workers=2)
    assert _read_all(tmp_path / "folder") == reference


def test_rerun_skips_finished_units_and_redoes_changed_ones(tmp_path, vocab):
  docs = _documents()
  files = [_write_bert_layout(tmp_path / f"{i}.txt", docs[i::3]) for i in range(3)]
  out = tmp_path / "out"
  first = prepare.prepare(files, out, vocab)
  mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
  again = prepare.prepare(files, out, vocab)
  assert (again["done"], again["skipped"]) == (0, 3)
  assert again["manifest"] == first["manifest"]
  assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == mtimes
  _write_bert_layout(tmp_path / "1.txt", docs[1::3][:5])  # An input changes: its unit is redone.
  changed = prepare.prepare(files, out, vocab)
  assert (changed["done"], changed["skipped"]) == (1, 2)
  assert changed["manifest"]["num_documents"] == len(docs[0::3]) + 5 + len(docs[2::3])
  fewer = prepare.prepare(files[:2], out, vocab)  # An input is dropped: so is its unit.
  assert fewer["manifest"]["num_documents"] == len(docs[0::3]) + 5
  assert not [f for f in os.listdir(out) if f.startswith("docs-000002")]


def test_interrupted_run_leaves_nothing_complete_and_resumes(tmp_path, vocab):
  docs = _documents()
  files = [_write_bert_layout(tmp_path / f"{i}.txt", docs[i::4]) for i in range(4)]
  clean = prepare.prepare(files, tmp_path / "clean", vocab, docs_per_shard=5)["manifest"]
  out = tmp_path / "out"
  # A run killed (SIGKILL-like os._exit) at its 7th rename: some shards are in place, one unit
  # is half done, no manifest.
  code = (
    "import os, sys; from maskax.data import prepare\n"
    "real, n = os.replace, [0]\n"
    "def dying(a, b):\n"
    "  n[0] += 1\n"
    "  if n[0] == 7: os._exit(9)\n"
    "  real(a, b)\n"
    "os.replace = dying\n"
    f"prepare.prepare({files!r}, {str(out)!r}, {vocab!r}, docs_per_shard=5)\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 9, proc.stderr
  assert not (out / "manifest.json").exists()
  assert any(".tmp-" in f for f in os.listdir(out))
  with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
    prepared.PreparedDocs(out)
  # A shard cut short never reads as finished, even under its final name.
  shard = out / "docs-000003-0000.bin"
  shard.write_bytes(b"x" * 100)
  assert docfile.read_footer(shard) is None
  resumed = prepare.prepare(files, out, vocab, docs_per_shard=5)
  assert 0 < resumed["skipped"] < 4
  assert resumed["manifest"]["fingerprint"] == clean["fingerprint"]
  assert not any(".tmp-" in f for f in os.listdir(out))
  assert _shard_bytes(out) == _shard_bytes(tmp_path / "clean")


def test_worker_killed_mid_unit_fails_cleanly_and_resumes(tmp_path, vocab):
  docs = _documents() * 3
  files = [_write_bert_layout(tmp_path / f"{i}.txt", docs[i::6]) for i in range(6)]
  clean = prepare.prepare(files, tmp_path / "clean", vocab)["manifest"]
  out = tmp_path / "out"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "maskax.data.prepare",
      "--num_workers=2",
      f"--output={out}",
      f"--vocab={vocab}",
      *(f"--input={f}" for f in files),
    ],
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:  # SIGKILL the first worker seen writing a shard.
    tmp = [f for f in (os.listdir(out) if out.exists() else []) if ".bin.tmp-" in f]
    if tmp:
      os.kill(int(tmp[0].rsplit("-", 1)[1]), signal.SIGKILL)
      break
    time.sleep(0.002)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2 and "worker died" in stderr.splitlines()[-1], stderr
  assert not (out / "manifest.json").exists()
  resumed = prepare.prepare(files, out, vocab, num_workers=2)
  assert resumed["manifest"]["fingerprint"] == clean["fingerprint"]
  assert _shard_bytes(out) == _shard_bytes(tmp_path / "clean")


@pytest.mark.parametrize(
  "name, content, problem",
  [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"  \n\n \n", "holds no text"),
    ("nul.txt", b"some text\0more", "is binary"),
    ("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "not UTF-8"),
    ("broken.txt.gz", b"\x1f\x8b\x08\x00garbage", "gzip"),
    ("bad.jsonl", b'{"text": "fine"}\nnot json\n', "not JSON"),
  ],
)
def test_bad_inputs_fail_with_one_line_naming_the_file(
  tmp_path, vocab, text_file, name, content, problem
):
  bad = tmp_path / name
  bad.write_bytes(content)
  with pytest.raises(ValueError, match=problem) as error:
    prepare.prepare([text_file, str(bad)], tmp_path / "out", vocab)
  assert str(error.value).startswith(str(bad)) and "\n" not in str(error.value)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "maskax.data.prepare",
      f"--input={bad}",
      f"--output={tmp_path / 'cli'}",
      f"--vocab={vocab}",
      "--num_workers=1",
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and str(bad) in proc.stderr, proc.stderr


def test_missing_input_and_late_non_utf8(tmp_path, vocab):
  with pytest.raises(ValueError, match="nowhere.*matches no file"):
    prepare.prepare([str(tmp_path / "nowhere" / "*.txt")], tmp_path / "out", vocab)
  late = tmp_path / "late.txt"  # Past the 64 KiB sniffed up front: found while streaming.
  late.write_bytes(b"A sentence.\n" * 8000 + b"\n\xff\xfe broken\n")
  with pytest.raises(ValueError, match=r"late\.txt: is not UTF-8 text .* at byte 96001"):
    prepare.prepare([str(late)], tmp_path / "out", vocab)
  assert not any(f.endswith(".bin") for f in os.listdir(tmp_path / "out"))


def test_vocab_txt_and_u16_tokens(tmp_path, text_file, vocab):
  tok = tk.load(vocab)
  vocab_txt = tmp_path / "vocab.txt"
  vocab_txt.write_text("\n".join(tok.id_to_token(i) for i in range(tok.vocab_size)) + "\n")
  prepare.prepare([text_file], tmp_path / "out", str(vocab_txt))
  docs = prepared.PreparedDocs(tmp_path / "out")
  assert docs.shards[0].tokens.dtype == np.uint16
  assert (
    docs.document(0)
    == bert_data.tokenize_documents(
      corpus.load_documents(text_file)[:1], tk.from_vocab_txt(vocab_txt)
    )[0]
  )
