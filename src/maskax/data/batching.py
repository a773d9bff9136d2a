"""Resumable, deterministic, process-sharded batch iterators (host-side NumPy).

`EpochSampler` is the generic part: a per-epoch permutation from (seed, epoch), cut into global
batches; process p reads rows [p * B/n, (p + 1) * B/n) of each global batch. `BertBatches`
turns BERT instances into the batches `models/bert.py` trains on. State is (epoch, position),
so `set_state(get_state())` continues bitwise identically, in one process or many.

Training reads prepared shards (`maskax.data.shards`, through `bert_cache`); `BertBatches`, which
builds every instance in memory, stays as the reference those are checked against
(tests/shards_test.py) and measured against (benchmarks/bert_data_bench.py).
"""

import numpy as np

from maskax.data import bert_data
from maskax.data.tokenizer import WordPieceTokenizer

# Static masking: pairs and masks drawn 5 times per document (BERT used 10 on its large corpus).
_STATIC_DUPE_FACTOR = 5


class EpochSampler:
  """Deterministic order over `num_examples` in global batches (the remainder is dropped)."""

  def __init__(
    self,
    num_examples: int,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
  ):
    if batch_size < 1 or process_count < 1 or batch_size % process_count:
      raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of "
        f"process_count={process_count} (each process takes an equal share)"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count})"
      )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed={seed!r} must be a non-negative int")
    if num_examples < batch_size:
      raise ValueError(
        f"batch_size={batch_size} exceeds the {num_examples} examples; lower batch_size or add data"
      )
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, int(seed)
    self.shuffle, self.num_epochs = shuffle, num_epochs
    self.batches_per_epoch = num_examples // batch_size
    self.local_batch_size = batch_size // process_count
    self.local_rows = slice(
      process_index * self.local_batch_size, (process_index + 1) * self.local_batch_size
    )
    self.epoch, self.position = 0, 0
    self._order_epoch, self._order = -1, None

  def order(self, epoch: int) -> np.ndarray:
    """i64[N]: the example order of `epoch` (every process computes the same one)."""
    if epoch != self._order_epoch:
      rng = np.random.default_rng([self.seed, 3, epoch])
      n = self.num_examples
      self._order = rng.permutation(n) if self.shuffle else np.arange(n)
      self._order_epoch = epoch
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> tuple[int, int, np.ndarray]:
    """Returns (epoch, position, rows i64[B]) of the next global batch and advances."""
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    epoch, position = self.epoch, self.position
    rows = self.order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
    self.position += 1
    if self.position == self.batches_per_epoch:
      self.epoch, self.position = epoch + 1, 0
    return epoch, position, rows

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position}

  def set_state(self, state: dict) -> None:
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < self.batches_per_epoch:
      raise ValueError(
        f"state={state} is out of range: position must be in "
        f"[0, {self.batches_per_epoch}) and epoch >= 0"
      )
    self.epoch, self.position = epoch, position


def _check(name: str, ok: bool, rule: str, value) -> None:
  if not ok:
    raise ValueError(f"{name}={value!r} {rule}")


class BertBatches:
  """BERT pretraining batches (MLM + NSP), static or dynamic masking, resumable and sharded.

  `data` is a list of documents (lists of sentences) or prebuilt `bert_data.Instances`.
  Instances are built once (`dupe_factor` passes; default 5 for static, 1 for dynamic, whose
  masks change every batch anyway) and shuffled per epoch from `seed`. Static masks are drawn
  once per instance; dynamic masks for batch (epoch, position) come from a generator seeded by
  (seed, epoch, position), so a resumed iterator draws the same masks.

  Each batch (B = batch_size / process_count local rows, T = seq_len, P = max_predictions):
  input_ids i32[B, T], segment_ids i32[B, T], input_mask bool[B, T] (True = real token),
  masked_lm_positions i32[B, P], masked_lm_ids i32[B, P], masked_lm_weights f32[B, P],
  next_sentence_labels i32[B] (0 IsNext, 1 random), original_ids i32[B, T] (unmasked tokens,
  for the predict-every-token ablations), and with `dense_labels` also
  masked_lm_dense_weights f32[B, T] (1 at predicted positions: labels are `original_ids`).
  Dynamic masking keeps at most P predictions per row; `stats` counts the capped rows.
  """

  def __init__(
    self,
    data,
    tokenizer: WordPieceTokenizer,
    *,
    batch_size: int,
    seq_len: int,
    max_predictions: int,
    masking: str = "static",
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    masked_lm_prob: float = 0.15,
    whole_word_masking: bool = False,
    short_seq_prob: float = 0.1,
    dupe_factor: int | None = None,
    dense_labels: bool = False,
    num_epochs: int | None = None,
  ):
    _check("masking", masking in ("static", "dynamic"), "must be 'static' or 'dynamic'", masking)
    _check("seq_len", seq_len >= 5, "must be >= 5 to hold [CLS] A [SEP] B [SEP]", seq_len)
    _check("masked_lm_prob", 0.0 < masked_lm_prob < 1.0, "must be in (0, 1)", masked_lm_prob)
    _check(
      "max_predictions",
      1 <= max_predictions <= seq_len,
      f"must be in [1, seq_len={seq_len}]",
      max_predictions,
    )
    _check(
      "whole_word_masking",
      not (whole_word_masking and masking == "dynamic"),
      "is implemented for masking='static' only",
      whole_word_masking,
    )
    _check(
      "batch_size",
      batch_size >= 1 and batch_size % max(process_count, 1) == 0,
      f"must be a positive multiple of process_count={process_count}",
      batch_size,
    )
    self.tokenizer, self.masking, self.seed = tokenizer, masking, seed
    self.seq_len, self.max_predictions = seq_len, max_predictions
    self.masked_lm_prob, self.dense_labels = masked_lm_prob, dense_labels
    if isinstance(data, bert_data.Instances):
      _check(
        "seq_len",
        data.tokens.shape[1] == seq_len,
        f"must equal the instances' length {data.tokens.shape[1]}",
        seq_len,
      )
      self.instances = data
    else:
      if dupe_factor is None:
        dupe_factor = _STATIC_DUPE_FACTOR if masking == "static" else 1
      self.instances = bert_data.create_instances(
        bert_data.tokenize_documents(data, tokenizer),
        tokenizer,
        seq_len=seq_len,
        seed=seed,
        short_seq_prob=short_seq_prob,
        dupe_factor=dupe_factor,
      )
    self.sampler = EpochSampler(
      len(self.instances.lengths),
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      num_epochs=num_epochs,
    )
    self._static = None
    if masking == "static":
      self._static = bert_data.mask_static(
        self.instances,
        tokenizer,
        max_predictions=max_predictions,
        masked_lm_prob=masked_lm_prob,
        seed=seed,
        whole_word=whole_word_masking,
      )
    self.stats = {"rows": 0, "capped_rows": 0, "dropped_predictions": 0}

  @property
  def batches_per_epoch(self) -> int:
    return self.sampler.batches_per_epoch

  def __iter__(self):
    return self

  def _dynamic_masks(self, epoch: int, position: int, rows: np.ndarray) -> dict:
    rng = np.random.default_rng([self.seed, 2, epoch, position])
    draws = bert_data.dynamic_draws(
      rng, self.sampler.batch_size, self.seq_len, self.max_predictions, self.tokenizer.vocab_size
    )
    local = {k: v[self.sampler.local_rows] for k, v in draws.items()}
    tokens = self.instances.tokens[rows]
    lengths = self.instances.lengths[rows]
    maskable = bert_data.maskable_positions(tokens, lengths, self.tokenizer.special_ids)
    out = bert_data.mask_dynamic(
      tokens,
      maskable,
      local,
      masked_lm_prob=self.masked_lm_prob,
      max_predictions=self.max_predictions,
      mask_id=self.tokenizer.mask_id,
    )
    bert_data.count_capped(self.stats, out.pop("num_drawn"), self.max_predictions)
    return out

  def __next__(self) -> dict:
    epoch, position, global_rows = next(self.sampler)
    rows = global_rows[self.sampler.local_rows]
    inst = self.instances
    if self._static is not None:
      masks = {k: v[rows] for k, v in self._static.items()}
    else:
      masks = self._dynamic_masks(epoch, position, rows)
    batch = dict(
      input_ids=masks["input_ids"],
      segment_ids=inst.segment_ids[rows],
      input_mask=np.arange(self.seq_len)[None, :] < inst.lengths[rows][:, None],
      masked_lm_positions=masks["masked_lm_positions"],
      masked_lm_ids=masks["masked_lm_ids"],
      masked_lm_weights=masks["masked_lm_weights"],
      next_sentence_labels=inst.next_sentence_labels[rows],
      original_ids=inst.tokens[rows],
    )
    if self.dense_labels:
      dense = np.zeros((len(rows), self.seq_len), np.float32)
      # Unused slots point at position 0 with weight 0; real positions are distinct and > 0.
      np.put_along_axis(dense, batch["masked_lm_positions"], batch["masked_lm_weights"], axis=1)
      batch["masked_lm_dense_weights"] = dense
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position of the iterator, plus what must match on restore."""
    return dict(
      self.sampler.get_state(),
      seed=int(self.seed),
      masking=self.masking,
      num_instances=int(len(self.instances.lengths)),
      batch_size=self.sampler.batch_size,
    )

  def set_state(self, state: dict) -> None:
    """Continues from `state`; the data, seed, masking and global batch size must match."""
    for key in ("seed", "masking", "num_instances", "batch_size"):
      mine = self.get_state()[key]
      if state.get(key) != mine:
        raise ValueError(
          f"state[{key!r}]={state.get(key)!r} does not match this "
          f"iterator's {key}={mine!r}; restore into an iterator built "
          "the same way"
        )
    self.sampler.set_state(state)
