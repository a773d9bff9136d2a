"""Resumable, deterministic batch iterators that load only this process's rows.

Both iterators derive batch `i` from `(seed, i)` alone, so `get_state()` is just the position and
a resumed run draws bitwise the same batches as an uninterrupted one. Each yields the
*process-local* rows of the global batch (`batch_size // process_count` rows); the training loop
assembles the global array with `maskax.training.sharding.shard_batch`.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np


def _check_split(batch_size: int, process_count: int, process_index: int) -> int:
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  if batch_size % process_count:
    raise ValueError(
      f"batch_size={batch_size} must be a multiple of the number of processes "
      f"({process_count}); each process loads an equal share."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} out of range for {process_count} processes.")
  return batch_size // process_count


class SyntheticBatches:
  """Batches made on the fly: `make_batch(rng, n) -> dict of [n, ...] arrays`.

  Batch `i` is `make_batch(np.random.default_rng([seed, i]), batch_size)` restricted to this
  process's rows, so every process sees the same global batch without communicating.
  """

  def __init__(
    self,
    make_batch: Callable[[np.random.Generator, int], Mapping[str, np.ndarray]],
    batch_size: int,
    seed: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
  ):
    self._local = _check_split(batch_size, process_count, process_index)
    self._make, self._batch_size, self._seed = make_batch, batch_size, seed
    self._rows = slice(process_index * self._local, (process_index + 1) * self._local)
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self._make(np.random.default_rng([self._seed, self.position]), self._batch_size)
    self.position += 1
    return {k: np.asarray(v)[self._rows] for k, v in batch.items()}

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: Mapping) -> None:
    self.position = int(state["position"])


class ArrayBatches:
  """Shuffled epochs over fixed arrays (every array `[N, ...]`), dropping the ragged tail.

  The permutation of epoch `e` comes from `(seed, e)`; position = batches drawn so far.
  """

  def __init__(
    self,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
  ):
    self._local = _check_split(batch_size, process_count, process_index)
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays must share their first dimension; got {sizes}.")
    self._n = next(iter(sizes.values()))
    if self._n < batch_size:
      raise ValueError(
        f"dataset has {self._n} examples, fewer than batch_size={batch_size}; "
        "lower the batch size or add data."
      )
    self._arrays, self._batch_size, self._seed, self._shuffle = arrays, batch_size, seed, shuffle
    self._offset = process_index * self._local
    self.batches_per_epoch = self._n // batch_size
    self.position = 0

  def __iter__(self):
    return self

  def _order(self, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self._n)
    return np.random.default_rng([self._seed, epoch]).permutation(self._n)

  def __next__(self) -> dict:
    epoch, index = divmod(self.position, self.batches_per_epoch)
    start = index * self._batch_size + self._offset
    rows = self._order(epoch)[start : start + self._local]
    self.position += 1
    return {k: np.asarray(v)[rows] for k, v in self._arrays.items()}

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: Mapping) -> None:
    self.position = int(state["position"])


def fixed_batches(
  arrays: Mapping[str, np.ndarray],
  batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> list[dict]:
  """An evaluation split in order, as process-local batches; the last batch is padded by
  repeating rows and carries `"valid": bool[B]` so padded rows can be given weight 0."""
  local = _check_split(batch_size, process_count, process_index)
  n = len(next(iter(arrays.values())))
  if n == 0:
    raise ValueError("the evaluation split is empty.")
  batches = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, n - 1)[process_index * local : (process_index + 1) * local]
    batch = {k: np.asarray(v)[idx] for k, v in arrays.items()}
    batch["valid"] = valid[process_index * local : (process_index + 1) * local]
    batches.append(batch)
  return batches


def bucket_boundaries(max_length: int, num_buckets: int, *, multiple_of: int = 1) -> tuple:
  """Evenly spaced padded lengths, each rounded up to `multiple_of`, the last one max_length."""
  if max_length < 1 or num_buckets < 1 or multiple_of < 1:
    raise ValueError(
      "need max_length, num_buckets, multiple_of >= 1, got "
      f"{max_length}, {num_buckets}, {multiple_of}"
    )
  edges = {
    min(max_length, -(-math.ceil(max_length * k / num_buckets) // multiple_of) * multiple_of)
    for k in range(1, num_buckets + 1)
  }
  return tuple(sorted(edges))


def bucket_for(length, boundaries):
  """Smallest boundary >= length: the padded size for a sequence (or a batch's max length).

  length: int or int array (host side, before batching); returns the same shape.
  """
  length = np.asarray(length)
  if length.size and int(length.max()) > boundaries[-1]:
    raise ValueError(f"length {int(length.max())} exceeds the largest bucket {boundaries[-1]}")
  size = np.asarray(boundaries)[np.searchsorted(boundaries, length, side="left")]
  return int(size) if size.ndim == 0 else size
