"""Parallel text for seq2seq: a generated numbers task, a TSV loader, vocabularies, length buckets.

The generated task translates English number names, written in one of four styles, into the
canonical digit form with thousands separators. 321405 becomes, in each style:
  british   three hundred and twenty-one thousand , four hundred and five
  american  three hundred twenty one thousand four hundred five
  digits    three two one four zero five
  mixed     3 2 1 thousand 4 0 5
and the target is always `3 2 1 , 4 0 5`. Lengths really vary (1 to 23 source tokens for up to
12 digits), the source vocabulary has a Zipf-like spread (hyphenated compounds such as
`ninety-seven` are rare; `hundred` is everywhere), and every example is a pure function of a
seed. A user's own tab-separated parallel text (`source<TAB>target`, whitespace tokens) goes
through the same vocabulary and padding code.

Ids: PAD 0, GO 1, EOS 2, UNK 3, then the words by descending training frequency (ties
alphabetical), so that id order is frequency order as the log-uniform candidate sampler of the
sampled softmax assumes. A vocabulary of fixed size caps the words by frequency (the rest map
to UNK) or, when the task has fewer words, pads with a generated lexicon of pseudo-words that
never occur, so that a 40,000-way softmax costs what it costs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np
from absl import logging

from maskax.data import iterators, user_files
from maskax.masking.tokens import EOS, GO, PAD, SPECIALS, UNK
from maskax.training import paths

STYLES = ("british", "american", "digits", "mixed")

_ONES = (
  "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
  "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("", "thousand", "million", "billion")


def _below_hundred(n: int, hyphen: bool) -> list[str]:
  if n < 20:
    return [_ONES[n]]
  tens, ones = divmod(n, 10)
  if not ones:
    return [_TENS[tens]]
  return [f"{_TENS[tens]}-{_ONES[ones]}"] if hyphen else [_TENS[tens], _ONES[ones]]


def _group_words(n: int, british: bool) -> list[str]:
  """Words for 1 <= n <= 999."""
  hundreds, rest = divmod(n, 100)
  words = [_ONES[hundreds], "hundred"] if hundreds else []
  if rest:
    words += (["and"] if british and hundreds else []) + _below_hundred(rest, british)
  return words


def number_words(n: int, style: str) -> list[str]:
  """The source tokens of `n` (0 <= n < 10**12) written in `style` (module docstring)."""
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  if not 0 <= n < 10**12:
    raise ValueError(f"n must lie in [0, 10**12), got {n}")
  if style == "digits":
    return [_ONES[int(d)] for d in str(n)]
  if n == 0:
    return ["0"] if style == "mixed" else ["zero"]
  groups = [(n // 1000**k) % 1000 for k in range(3, -1, -1)]
  parts = []
  for k, g in zip(range(3, -1, -1), groups):
    if not g:
      continue
    words = list(str(g)) if style == "mixed" else _group_words(g, style == "british")
    if style == "british" and k == 0 and g < 100 and n >= 1000:
      words = ["and"] + words  # "one thousand and five"
    parts.append(words + ([_SCALES[k]] if k else []))
  out = []
  for i, words in enumerate(parts):
    # British commas separate the groups, except before "and five" ("one thousand and five").
    out += ([","] if style == "british" and i and words[0] != "and" else []) + words
  return out


def canonical_digits(n: int) -> list[str]:
  """The target tokens of `n`: its digits with thousands separators, e.g. 3 2 1 , 4 0 5."""
  return [c for c in f"{n:,}"]


def generate_numbers(
  count: int, *, seed: int, max_digits: int = 9, styles=STYLES, exclude=frozenset()
) -> tuple[list[tuple[list[str], list[str]]], list[int]]:
  """`count` (source tokens, target tokens) pairs and their numbers, a pure function of `seed`.

  The digit count is uniform in [1, max_digits], then the number is uniform among numbers of
  that many digits, skipping those in `exclude` (a held-out split excludes the training set).
  """
  if not 1 <= max_digits <= 12:
    raise ValueError(f"max_digits must lie in [1, 12], got {max_digits}")
  bad = [s for s in styles if s not in STYLES]
  if bad or not styles:
    raise ValueError(f"styles must be a non-empty subset of {STYLES}, got {tuple(styles)}")
  rng = np.random.default_rng([seed, 11])
  pairs, numbers, tries = [], [], 0
  while len(pairs) < count:
    tries += 1
    if tries > 100 * count + 10_000:
      raise ValueError(
        f"cannot draw {count} numbers of up to {max_digits} digits outside "
        f"`exclude` ({len(exclude)} numbers); raise max_digits or lower count"
      )
    digits = int(rng.integers(1, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    n = int(rng.integers(low, 10**digits))
    style = styles[int(rng.integers(len(styles)))]
    if n in exclude:
      continue
    pairs.append((number_words(n, style), canonical_digits(n)))
    numbers.append(n)
  return pairs, numbers


def load_tsv(path: str) -> list[tuple[list[str], list[str]]]:
  """Pairs from a UTF-8 file of `source<TAB>target` lines (whitespace tokens; skips blanks)."""
  pairs = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) != 2 or not fields[0].split() or not fields[1].split():
        raise ValueError(
          f"{path}:{number}: expected 'source<TAB>target' with both sides "
          f"non-empty, got {line[:80]!r}"
        )
      pairs.append((fields[0].split(), fields[1].split()))
  if not pairs:
    raise ValueError(f"{path} holds no 'source<TAB>target' lines")
  return pairs


def pseudo_words(count: int, *, seed: int, avoid=frozenset()) -> list[str]:
  """`count` distinct generated words of 3 to 4 consonant-vowel syllables, none in `avoid`."""
  consonants, vowels = "bdfgklmnprstvzh", "aeiou"
  syllables = [c + v for c in consonants for v in vowels]
  rng = np.random.default_rng([seed, 7])
  words, seen = [], set(avoid)
  while len(words) < count:
    n = int(rng.integers(3, 5))
    word = "".join(syllables[i] for i in rng.integers(len(syllables), size=n))
    if word not in seen:
      seen.add(word)
      words.append(word)
  return words


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Words by id: the four specials, then words by descending frequency, then lexicon padding."""

  words: tuple[str, ...]
  num_real: int  # specials + words seen in the data (the rest is generated padding)

  def __post_init__(self):
    object.__setattr__(self, "_ids", {w: i for i, w in enumerate(self.words)})

  def __len__(self) -> int:
    return len(self.words)

  def encode(self, tokens) -> list[int]:
    return [self._ids.get(t, UNK) for t in tokens]

  def decode(self, ids) -> list[str]:
    """Tokens up to (not including) the first EOS; PAD and GO are dropped."""
    out = []
    for i in ids:
      if i == EOS:
        break
      if i not in (PAD, GO):
        out.append(self.words[i])
    return out


def build_vocabulary(token_lists, *, size: int = 0, lexicon_seed: int = 0) -> Vocabulary:
  """Vocabulary from training token lists.

  size = 0 keeps every word; otherwise exactly `size` ids: the `size - 4` most frequent words
  (ties alphabetical; the rest become UNK), or every word plus generated pseudo-words.
  """
  if size and size < len(SPECIALS) + 1:
    raise ValueError(f"vocabulary size must be 0 (all words) or >= {len(SPECIALS) + 1}, got {size}")
  counts = collections.Counter(t for tokens in token_lists for t in tokens)
  for special in SPECIALS:
    counts.pop(special, None)
  ranked = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))]
  if size:
    ranked = ranked[: size - len(SPECIALS)]
  words = list(SPECIALS) + ranked
  num_real = len(words)
  if size > num_real:
    words += pseudo_words(size - num_real, seed=lexicon_seed, avoid=frozenset(words))
  return Vocabulary(tuple(words), num_real)


def save_vocabularies(path: str, source: Vocabulary, target: Vocabulary) -> None:
  """Writes both sides' words to `path` (JSON) atomically: a run's vocabularies, saved with it
  so that a trained model reads and writes the ids it learned (rebuilding them from the data
  needs the data, and a changed file would silently shuffle the ids)."""
  saved = {
    side: {"words": list(v.words), "num_real": v.num_real}
    for side, v in (("source", source), ("target", target))
  }
  paths.write_text_atomic(path, json.dumps(saved, ensure_ascii=False))


def load_vocabularies(path: str) -> tuple[Vocabulary, Vocabulary]:
  """(source, target) as `save_vocabularies` wrote them."""
  with paths.as_path(path).open() as f:
    saved = json.load(f)
  return tuple(
    Vocabulary(tuple(saved[side]["words"]), saved[side]["num_real"])
    for side in ("source", "target")
  )


def encode_sources(token_lists, vocab: Vocabulary, *, multiple_of: int = 8):
  """Source sentences to translate: (source i32[B, S], source_len i32[B]).

  S is the longest sentence rounded up to `multiple_of` (fewer compiled shapes); padding holds
  PAD. Raises ValueError naming the words outside `vocab` (they would all read as UNK) and for
  an empty sentence.
  """
  known = set(vocab.words[len(SPECIALS) : vocab.num_real])
  unknown = sorted({t for tokens in token_lists for t in tokens} - known)
  if unknown:
    raise ValueError(
      f"words outside the source vocabulary: {unknown[:20]}; the model knows "
      f"{vocab.num_real - len(SPECIALS)} words."
    )
  if not token_lists or not all(token_lists):
    raise ValueError("every source sentence needs at least one word.")
  lengths = np.array([len(t) for t in token_lists], np.int32)
  S = -(-int(lengths.max()) // multiple_of) * multiple_of
  source = np.full((len(token_lists), S), PAD, np.int32)
  for row, tokens in enumerate(token_lists):
    source[row, : len(tokens)] = vocab.encode(tokens)
  return source, lengths


def encode_pairs(
  pairs,
  source_vocab: Vocabulary,
  target_vocab: Vocabulary,
  *,
  max_source_len: int,
  max_target_len: int,
) -> tuple[dict, int]:
  """Padded id arrays of every pair that fits; returns (arrays, number of pairs dropped).

  With N kept pairs, S = max_source_len and T = max_target_len + 1 (room for GO / EOS):
  source i32[N, S], source_len i32[N], target_in i32[N, T] = GO y, target_out i32[N, T] = y EOS,
  target_len i32[N] = len(y) + 1. Padding holds PAD; the lengths are the masks' source of truth.
  """
  S, T = max_source_len, max_target_len + 1
  kept = [(s, t) for s, t in pairs if 1 <= len(s) <= S and 1 <= len(t) <= max_target_len]
  n = len(kept)
  arrays = {
    "source": np.full((n, S), PAD, np.int32),
    "source_len": np.zeros(n, np.int32),
    "target_in": np.full((n, T), PAD, np.int32),
    "target_out": np.full((n, T), PAD, np.int32),
    "target_len": np.zeros(n, np.int32),
  }
  for i, (s, t) in enumerate(kept):
    src, tgt = source_vocab.encode(s), target_vocab.encode(t)
    arrays["source"][i, : len(src)] = src
    arrays["source_len"][i] = len(src)
    arrays["target_in"][i, : len(tgt) + 1] = [GO] + tgt
    arrays["target_out"][i, : len(tgt) + 1] = tgt + [EOS]
    arrays["target_len"][i] = len(tgt) + 1
  return arrays, len(pairs) - n


def bucket_batches(arrays, batch_size: int, boundaries) -> list[dict]:
  """Held-out batches grouped by source-length bucket, each cut to its bucket's length.

  arrays as from `encode_pairs` (source i32[N, S], S = boundaries[-1]). Every batch has
  `batch_size` rows (the last of a bucket repeats a row; "valid" bool[B] marks real rows) and
  source i32[B, S_b] with S_b its bucket boundary, so decoding compiles once per bucket.
  """
  if arrays["source"].shape[1] != boundaries[-1]:
    raise ValueError(
      f"the largest bucket {boundaries[-1]} must equal the padded source length "
      f"{arrays['source'].shape[1]}"
    )
  sizes = iterators.bucket_for(arrays["source_len"], boundaries)
  batches = []
  for size in boundaries:
    rows = np.flatnonzero(sizes == size)
    if not rows.size:
      continue
    part = {k: v[rows] for k, v in arrays.items()}
    part["source"] = part["source"][:, :size]
    batches += iterators.fixed_batches(part, batch_size)
  return batches


def number_pairs(
  num_train: int, num_eval: int, *, seed: int, max_digits: int, styles=STYLES
) -> tuple[list, list]:
  """(training pairs, held-out pairs) of the generated task; held-out numbers never occur in
  training, and both splits are a pure function of `seed`."""
  train, numbers = generate_numbers(num_train, seed=seed, max_digits=max_digits, styles=styles)
  held_out, _ = generate_numbers(
    num_eval, seed=seed + 1, max_digits=max_digits, styles=styles, exclude=frozenset(numbers)
  )
  return train, held_out


def split_pairs(pairs, eval_fraction: float, *, seed: int) -> tuple[list, list]:
  """(training pairs, held-out pairs) of a user's file: a seeded random `eval_fraction`."""
  train, held_out = user_files.split_held_out(
    len(pairs), eval_fraction, seed=[seed, 5], what="pairs"
  )
  return [pairs[i] for i in train], [pairs[i] for i in held_out]


def build_vocabularies(train_pairs, *, size: int, seed: int) -> tuple[Vocabulary, Vocabulary]:
  """(source, target) vocabularies of the training pairs (`build_vocabulary` per side)."""
  return (
    build_vocabulary([s for s, _ in train_pairs], size=size, lexicon_seed=seed),
    build_vocabulary([t for _, t in train_pairs], size=size, lexicon_seed=seed + 1),
  )


def saved_vocabularies(path: str, rebuild) -> tuple[Vocabulary, Vocabulary]:
  """A run's (source, target) vocabularies from `path` (`save_vocabularies`), or for a run
  trained before they were saved, `rebuild()`: built from the data as training built them."""
  if os.path.exists(path):
    return load_vocabularies(path)
  logging.warning(
    "%s is missing (a run from before vocabularies were saved): rebuilding them from the data", path
  )
  return rebuild()


@dataclasses.dataclass
class TranslationData:
  """What a seq2seq run trains and evaluates on (`make_data`).

  train: `encode_pairs` arrays of the training pairs; eval_batches: `bucket_batches` of the
  held-out pairs; eval_shapes: how many source shapes those batches have (compiled shapes).
  """

  source_vocab: Vocabulary
  target_vocab: Vocabulary
  train: dict
  eval_batches: list
  eval_shapes: int


def make_data(
  train_pairs,
  eval_pairs,
  *,
  vocab_size: int,
  vocab_seed: int,
  max_source_len: int,
  max_target_len: int,
  batch_size: int,
  num_buckets: int,
) -> TranslationData:
  """Builds the vocabularies of the training pairs (`build_vocabularies`), encodes both splits
  (pairs too long are dropped, and counted in the log) and groups the held-out pairs into
  `num_buckets` source-length buckets of `batch_size` rows."""
  src_vocab, tgt_vocab = build_vocabularies(train_pairs, size=vocab_size, seed=vocab_seed)
  lengths = dict(max_source_len=max_source_len, max_target_len=max_target_len)
  train_arrays, dropped = encode_pairs(train_pairs, src_vocab, tgt_vocab, **lengths)
  eval_arrays, eval_dropped = encode_pairs(eval_pairs, src_vocab, tgt_vocab, **lengths)
  logging.info(
    "vocabularies: source %d ids (%d real), target %d ids (%d real); pairs: %d train, "
    "%d held out; dropped as too long: %d train, %d held out",
    len(src_vocab),
    src_vocab.num_real,
    len(tgt_vocab),
    tgt_vocab.num_real,
    len(train_arrays["source"]),
    len(eval_arrays["source"]),
    dropped,
    eval_dropped,
  )
  if not len(eval_arrays["source"]):
    raise ValueError("no held-out pair fits data.max_source_len / data.max_target_len")
  boundaries = iterators.bucket_boundaries(max_source_len, num_buckets)
  eval_batches = bucket_batches(eval_arrays, batch_size, boundaries)
  shapes = len({b["source"].shape for b in eval_batches})
  logging.info(
    "held-out source buckets %s: %d compiled shapes each for eval_step and decoding "
    "(training: one shape [%d, %d])",
    boundaries,
    shapes,
    batch_size,
    max_source_len,
  )
  return TranslationData(src_vocab, tgt_vocab, train_arrays, eval_batches, shapes)
