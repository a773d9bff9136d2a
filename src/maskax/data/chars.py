"""Characters for a char-RNN: a vocabulary with an unknown id, training windows, stateful streams.

Two layouts of one long text, for the two ways of training a recurrent language model:
- `windows`: pieces of `seq_len + 1` characters cut every `seq_len` characters, as
  (input, target) pairs shifted by one, so every character after the first is a target exactly
  once. Each window starts from a zero state, so the windows can be shuffled (`stateless`).
- `stream_windows`: the text cut into B contiguous streams, one per batch row; batch k holds
  window k of every stream, so the final carry of row b after batch k is the right initial carry
  of row b in batch k + 1 (`stateful`). The layout makes that true by construction: row b of
  batch k + 1 starts exactly where row b of batch k ended. Shuffling windows while carrying the
  state, as the old TensorFlow text-generation tutorial did with a `stateful=True` GRU
  (tensorflow/tensorflow#28766, #40067), hands each window the state of an unrelated one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from maskax.data import iterators
from maskax.training import paths

UNKNOWN = 0  # id of every character outside the vocabulary; generation must never emit it
UNKNOWN_CHAR = "\ufffd"  # how `decode` shows it


@dataclasses.dataclass(frozen=True)
class CharVocab:
  """Character <-> id; id 0 is the unknown character, ids 1..V-1 are `chars` in order."""

  chars: tuple[str, ...]

  def __post_init__(self):
    if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
      raise ValueError(
        "CharVocab.chars must be distinct single characters; build it with build_vocab(text)."
      )

  @property
  def size(self) -> int:
    """V: the characters plus the unknown id."""
    return len(self.chars) + 1

  def encode(self, text: str) -> np.ndarray:
    """str of N characters -> i32[N]; characters outside the vocabulary become UNKNOWN."""
    table = {c: i + 1 for i, c in enumerate(self.chars)}
    return np.fromiter((table.get(c, UNKNOWN) for c in text), np.int32, count=len(text))

  def decode(self, ids) -> str:
    """i32[N] -> str of N characters (UNKNOWN shows as U+FFFD)."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"decode takes i32[N], got shape {ids.shape}; decode rows one by one.")
    table = (UNKNOWN_CHAR,) + self.chars
    return "".join(table[i] if 0 <= i < len(table) else UNKNOWN_CHAR for i in ids.tolist())

  def banned(self) -> np.ndarray:
    """bool[V], True at UNKNOWN: the mask `maskax.masking.sampling` takes so it is never generated."""
    return np.arange(self.size) == UNKNOWN

  def to_json(self) -> str:
    return json.dumps({"chars": "".join(self.chars)}, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "CharVocab":
    return cls(tuple(json.loads(text)["chars"]))


def build_vocab(text: str) -> CharVocab:
  """Every distinct character of `text` (the training text), in code-point order."""
  if not text:
    raise ValueError("build_vocab needs non-empty training text.")
  return CharVocab(tuple(sorted(set(text))))


def split_tail(ids: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train ids, held-out ids): the held-out part is the last `eval_fraction` of the text.

  ids: i32[N]. A contiguous tail, not random windows, so held-out windows never overlap
  training ones and a long-context evaluation can run across the whole held-out text.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction={eval_fraction} must lie in (0, 1).")
  cut = len(ids) - int(round(len(ids) * eval_fraction))
  if cut < 2 or len(ids) - cut < 2:
    raise ValueError(
      f"text of {len(ids)} characters is too short to split with "
      f"data.eval_fraction={eval_fraction}; give a longer text."
    )
  return ids[:cut], ids[cut:]


def split_text(text: str, eval_fraction: float, *, vocab: CharVocab | None = None):
  """(vocab, train ids i32[N], held-out ids i32[M]) of a text: the held-out part is its last
  `eval_fraction` (`split_tail`); without `vocab`, the vocabulary of the training part."""
  cut = len(text) - int(round(len(text) * eval_fraction))
  vocab = vocab or build_vocab(text[:cut])
  return (vocab, *split_tail(vocab.encode(text), eval_fraction))


def save_vocab(path: str, vocab: CharVocab) -> None:
  """Writes `vocab` to `path` (JSON), creating its folder: a run's vocabulary, saved with it so
  that generation reads and writes the ids the model learned."""
  paths.as_path(os.path.dirname(path) or ".").mkdir(parents=True, exist_ok=True)
  paths.as_path(path).write_text(vocab.to_json())


def load_vocab(path: str) -> CharVocab:
  """The vocabulary `save_vocab` wrote; FileNotFoundError when the run has none."""
  if not paths.as_path(path).exists():
    raise FileNotFoundError(f"{path} is missing: the run's vocabulary is needed to read text.")
  return CharVocab.from_json(paths.as_path(path).read_text())


def unigram_bpc(train_ids, held_out, vocab_size: int) -> float:
  """Held-out bits/char of the training unigram distribution (add-one): the bar to beat."""
  counts = np.bincount(train_ids, minlength=vocab_size) + 1.0
  return float(-np.mean(np.log2(counts / counts.sum())[held_out]))


def _check_len(n: int, seq_len: int, what: str) -> None:
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  if n < seq_len + 1:
    raise ValueError(
      f"{what}: {n} characters is fewer than seq_len + 1 = {seq_len + 1}; lower "
      "data.seq_len or give a longer text."
    )


def windows(ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Windows of seq_len + 1 characters every seq_len: {inputs, targets: i32[N_w, T]}.

  ids: i32[N]. Window k is ids[kT : kT + T + 1]; inputs drop its last character, targets its
  first. The ragged tail (fewer than T + 1 characters) is dropped.
  """
  ids = np.asarray(ids, np.int32)
  _check_len(len(ids), seq_len, "windows")
  count = (len(ids) - 1) // seq_len
  starts = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  cut = ids[starts]
  return {"inputs": cut[:, :-1], "targets": cut[:, 1:]}


def stream_windows(
  ids: np.ndarray,
  num_streams: int,
  seq_len: int,
  *,
  what: str = "the training text",
  fix: str = "lower train.batch_size or data.seq_len, or give a longer text",
) -> dict[str, np.ndarray]:
  """The text as `num_streams` contiguous streams of windows: {inputs, targets: i32[B, K, T]}.

  ids: i32[N]. Stream b starts at character b * L with L = (N - 1) // B; window k of stream b is
  ids[bL + kT : bL + kT + T + 1] (inputs/targets as in `windows`), so
  inputs[b, k + 1, 0] == targets[b, k, -1]: window k + 1 continues window k. K = L // T; the
  last L - K*T characters of each stream are dropped. `what` and `fix` name the text and the
  settings in the error raised when it is too short (the caller knows which config keys count).
  """
  ids = np.asarray(ids, np.int32)
  if num_streams < 1:
    raise ValueError(f"{what}: {num_streams} streams requested; {fix}.")
  stride = (len(ids) - 1) // num_streams
  if stride < seq_len:
    raise ValueError(
      f"{what}: {len(ids)} characters split into {num_streams} streams leaves "
      f"{stride} per stream, fewer than the {seq_len} needed; {fix}."
    )
  count = stride // seq_len
  starts = (
    np.arange(num_streams)[:, None, None] * stride
    + np.arange(count)[None, :, None] * seq_len
    + np.arange(seq_len + 1)[None, None, :]
  )
  cut = ids[starts]
  return {"inputs": cut[..., :-1], "targets": cut[..., 1:]}


class StreamBatches:
  """Stateful batches: batch i = window i mod K of every stream, plus where to reset the carry.

  Yields {inputs, targets: i32[B_local, T], reset: bool[B_local]}; `reset` is True for the first
  window of an epoch (the streams wrap to their starts, which do not continue their ends).
  Batch i depends on i alone, so `get_state()` is the position and resuming is exact. Each
  process loads its own rows (streams) of the global batch.
  """

  def __init__(
    self,
    ids: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(
        f"batch_size={batch_size} must split evenly over {process_count} "
        f"processes (process_index={process_index}); each loads whole streams."
      )
    local = batch_size // process_count
    layout = stream_windows(ids, batch_size, seq_len)
    rows = slice(process_index * local, (process_index + 1) * local)
    self._inputs, self._targets = layout["inputs"][rows], layout["targets"][rows]
    self.windows_per_epoch = self._inputs.shape[1]
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    k = self.position % self.windows_per_epoch
    self.position += 1
    rows = self._inputs.shape[0]
    return {
      "inputs": self._inputs[:, k],
      "targets": self._targets[:, k],
      "reset": np.full((rows,), k == 0),
    }

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: Mapping) -> None:
    self.position = int(state["position"])


def shuffled_windows(
  ids: np.ndarray,
  batch_size: int,
  seq_len: int,
  seed: int,
  *,
  reset: bool = True,
  process_index: int = 0,
  process_count: int = 1,
) -> iterators.ArrayBatches:
  """Shuffled epochs of `windows`: {inputs, targets: i32[B_local, T], reset: bool[B_local]}.

  `reset=True` (stateless training) marks every window as starting from a zero state;
  `reset=False` reproduces the TF-tutorial bug of carrying state across shuffled windows.
  """
  arrays = windows(ids, seq_len)
  arrays["reset"] = np.full((len(arrays["inputs"]),), reset)
  return iterators.ArrayBatches(
    arrays, batch_size, seed, process_index=process_index, process_count=process_count
  )


def pad_prompts(prompts: Sequence[str], vocab: CharVocab) -> tuple[np.ndarray, np.ndarray]:
  """Ragged prompts -> (ids i32[B, T] right-padded with UNKNOWN, lengths i32[B]).

  T is the longest prompt. Every prompt needs at least one character (the first sampled
  character is predicted from the last prompt character).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(
      f"every prompt needs at least one character, got {list(prompts)!r}; "
      "e.g. --config.prompt='The '."
    )
  lengths = np.array([len(p) for p in prompts], np.int32)
  ids = np.full((len(prompts), int(lengths.max())), UNKNOWN, np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, : len(prompt)] = vocab.encode(prompt)
  return ids, lengths
