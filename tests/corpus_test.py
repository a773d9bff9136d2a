"""Tests for maskax.data.corpus: the embedded corpus, user files/folders, errors, the split."""

import pathlib
import platform

import pytest

from maskax.data import corpus


@pytest.fixture(scope="module")
def embedded():
  return corpus.load_documents()


def test_embedded_corpus_shape_and_order(embedded):
  info = corpus.corpus_info()
  assert info["python_version"] == platform.python_version()
  assert info["num_pydoc_topics"] == 79
  assert info["num_docstrings"] > 1500  # 2,270 on CPython 3.11.7.
  assert info["num_documents"] == len(embedded)
  assert info["num_sentences"] == sum(len(d) for d in embedded)
  assert all(d and all(s.strip() == s and s for s in d) for d in embedded)
  # Pydoc topics come first, sorted by topic name ('assert' is the first one).
  assert embedded[0][0] == 'The "assert" statement'


def test_stdlib_sources_sorted_and_skip_tests():
  stdlib = pathlib.Path(corpus.sysconfig.get_paths()["stdlib"])
  names = [p.relative_to(stdlib).as_posix() for p in corpus._stdlib_sources()]
  assert len(names) > 400 and "argparse.py" in names and "email/message.py" in names
  assert names == sorted(names)
  skipped = ("test/", "tests/", "idlelib/", "site-packages/")
  assert not any(part in f"/{n}" for n in names for part in [f"/{s}" for s in skipped])


def test_docstrings_read_without_import_in_source_order():
  long = "Long words here. " * 20
  source = (
    'raise SystemExit("imported!")\n'  # Would end the test run if the file were executed.
    f'class C:\n    """Class. {long}"""\n'
    f'    def method(self):\n        """Method. {long}"""\n'
    f'def f():\n    """Function. {long}"""\n'
    'def g():\n    """short"""\n'
  )
  docs = corpus._docstrings(source)
  assert [d.split(".")[0] for d in docs] == ["Class", "Method", "Function"]


def test_load_text_is_whole_corpus(embedded):
  text = corpus.load_text()
  assert text.startswith('The "assert" statement')
  assert embedded[-1][-1] in text
  assert abs(len(text) - corpus.corpus_info()["num_chars"]) < 2 * len(embedded) + 1


def test_split_sentences_rules():
  text = (
    "Heading\n*******\n\nFirst sentence. Second one!  Third?\nstill third\n\n"
    "   code line one\n   code line two\n"
  )
  assert corpus.split_sentences(text) == [
    "Heading",
    "First sentence.",
    "Second one!",
    "Third? still third",
    "code line one",
    "code line two",
  ]
  assert corpus.split_sentences("one line\ntwo line. Three\n", lines_are_sentences=True) == [
    "one line",
    "two line.",
    "Three",
  ]


def test_user_file_documents_split_by_blank_lines(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("A first line.\nA second line.\n\n\nB only line.\r\n", encoding="utf-8")
  assert corpus.load_documents(path) == [["A first line.", "A second line."], ["B only line."]]
  assert corpus.load_text(path) == "A first line.\nA second line.\n\nB only line."
  assert corpus.corpus_info(path)["num_documents"] == 2


def test_user_folder_one_document_per_txt_file(tmp_path):
  (tmp_path / "b.txt").write_text("Bee text. More bee.", encoding="utf-8")
  (tmp_path / "a.txt").write_text("Ay text.", encoding="utf-8")
  (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
  (tmp_path / "ignored.md").write_text("Not read.", encoding="utf-8")
  assert corpus.load_documents(tmp_path) == [["Ay text."], ["Bee text.", "More bee."]]
  assert corpus.load_text(tmp_path) == "Ay text.\n\nBee text. More bee."


def test_missing_path_names_it(tmp_path):
  missing = tmp_path / "nope.txt"
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    corpus.load_documents(missing)


@pytest.mark.parametrize("content", [b"", b"  \n\n \n"])
def test_empty_file_is_error(tmp_path, content):
  path = tmp_path / "empty.txt"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="empty.txt.*no text"):
    corpus.load_documents(path)
  with pytest.raises(ValueError, match="no text"):
    corpus.load_text(path)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01binary", b"ok text\x00\x00"])
def test_binary_file_is_error(tmp_path, content):
  (tmp_path / "good.txt").write_text("Fine.", encoding="utf-8")
  (tmp_path / "bad.txt").write_bytes(content)
  with pytest.raises(ValueError, match="bad.txt"):
    corpus.load_documents(tmp_path)
  with pytest.raises(ValueError, match="bad.txt"):
    corpus.load_documents(tmp_path / "bad.txt")


def test_folder_without_txt_is_error(tmp_path):
  (tmp_path / "x.md").write_text("text", encoding="utf-8")
  with pytest.raises(ValueError, match=r"no \*\.txt"):
    corpus.load_documents(tmp_path)


def test_split_documents_deterministic_disjoint_ordered():
  docs = [[f"doc {i}."] for i in range(50)]
  train, held = corpus.split_documents(docs, 0.2, seed=3)
  assert (train, held) == corpus.split_documents(docs, 0.2, seed=3)
  assert len(held) == 10 and len(train) == 40
  assert sorted(train + held) == sorted(docs)
  assert train == [d for d in docs if d in train] and held == [d for d in docs if d in held]
  assert corpus.split_documents(docs, 0.2, seed=4)[1] != held
  assert corpus.split_documents(docs, 0.0, seed=3) == (docs, [])
  assert len(corpus.split_documents(docs, 0.001, seed=3)[1]) == 1  # At least one when asked.


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 0.99])
def test_split_documents_bad_fraction(fraction):
  with pytest.raises(ValueError, match="eval_fraction"):
    corpus.split_documents([["a."], ["b."], ["c."]], fraction, seed=0)
