"""BERT pretraining batches streamed from a prepared corpus: NSP pairs, static or dynamic masks.

The rules are `bert_data`'s, through its functions (google-research/bert's pairing and masking,
HF's collator for dynamic masks); only the order in which documents are visited and the source
of randomness differ from `BertBatches`, which builds every instance in memory up front.

The global batch at position s is a pure function of (seed, s, the prepared data, options):
- Epoch e visits the training documents in a permutation from (seed, e), `window_docs` at a
  time. A window's instances are the pairs `bert_data._document_pairs` makes of each of its
  documents d with `pair_generator(seed, k, d)`, k = e mod dupe_factor: `dupe_factor`
  distinct versions of every document, as google-research/bert's duplicates, without storing
  any. They are shuffled by (seed, e, window) and cut into global batches of B; the last
  (< B) instances of a window are dropped.
- Static masks are keyed by (seed, k, d, pair index): an instance keeps its mask in every epoch
  with the same k. Dynamic masks are keyed by (seed, e, window, batch, row in the global batch).
Process p of n returns rows [p B/n, (p + 1) B/n). Every process plans the whole window (pairs as
token positions, no token read: ~16 us of CPU per instance here, most of it in bert_data's
pairing), and reads and masks only its own rows.
The state (epoch, window, position) is the same on every process, so a run resumes with any
process count. Memory: 8 bytes per training document (its id and the epoch's order), 56 bytes
per instance of one window (twice while it is shuffled); tokens stay in the page cache.
Letters: B batch, T seq_len, P max predictions.
"""

from __future__ import annotations

import array
import hashlib

import numpy as np

from maskax.data import bert_data, keyed_masks
from maskax.data import prepared as prepared_lib
from maskax.data.batching import _STATIC_DUPE_FACTOR

_ORDER_SEED, _SHUFFLE_SEED = 5, 6  # default_rng([seed, stream, ...]); batching uses 0-3.
_STATIC_KEY, _DYNAMIC_KEY = 1, 2
_PLAN_FIELDS = ("doc", "pair", "a_start", "a_len", "b_start", "b_len", "label")


def _pcg64_state(seed: int, dupe: int, doc: int) -> dict:
  # PCG64's 128-bit state and odd increment from a BLAKE2b digest: 3.6 us against 12 us for
  # np.random.default_rng([...]) (SeedSequence), paid once per document of every window.
  digest = hashlib.blake2b(f"{seed},{dupe},{doc}".encode(), digest_size=32).digest()
  return {
    "bit_generator": "PCG64",
    "has_uint32": 0,
    "uinteger": 0,
    "state": {
      "state": int.from_bytes(digest[:16], "little"),
      "inc": int.from_bytes(digest[16:], "little") | 1,
    },
  }


def pair_generator(seed: int, dupe: int, doc: int) -> np.random.Generator:
  """The generator `bert_data._document_pairs` draws document `doc`'s pairs from, version `dupe`."""
  bits = np.random.PCG64()
  bits.state = _pcg64_state(seed, dupe, doc)
  return np.random.Generator(bits)


class PreparedBatches:
  """BERT batches from a `PreparedDocs` (or its folder); the `BertBatches` format and options.

  Each batch (B = batch_size / process_count local rows): input_ids i32[B, T], segment_ids
  i32[B, T], input_mask bool[B, T], masked_lm_positions i32[B, P], masked_lm_ids i32[B, P],
  masked_lm_weights f32[B, P], next_sentence_labels i32[B], original_ids i32[B, T].
  `split` is "train" or "eval": the documents `prepared.held_out` keeps for evaluation (fixed by
  eval_fraction and split_seed), whose NSP random segments come from held-out documents only.
  `max_documents` > 0 reads only the corpus's first documents (in prepared order), each on the
  side of the split it has in the whole corpus (quick runs and tests on a slice).
  """

  def __init__(
    self,
    data,
    *,
    batch_size: int,
    seq_len: int,
    max_predictions: int,
    masking: str = "static",
    seed: int = 0,
    split: str = "train",
    eval_fraction: float = 0.05,
    split_seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    masked_lm_prob: float = 0.15,
    whole_word_masking: bool = False,
    short_seq_prob: float = 0.1,
    dupe_factor: int | None = None,
    num_epochs: int | None = None,
    window_docs: int = 4096,
    max_documents: int = 0,
  ):
    rules = [
      (masking in ("static", "dynamic"), "masking", "must be 'static' or 'dynamic'"),
      (split in ("train", "eval"), "split", "must be 'train' or 'eval'"),
      (seq_len >= 5, "seq_len", "must be >= 5 to hold [CLS] A [SEP] B [SEP]"),
      (0 < masked_lm_prob < 1, "masked_lm_prob", "must be in (0, 1)"),
      (1 <= max_predictions <= seq_len, "max_predictions", f"must be in [1, {seq_len}]"),
      (
        not (whole_word_masking and masking == "dynamic"),
        "whole_word_masking",
        "is implemented for masking='static' only",
      ),
      (
        batch_size >= 1 and process_count >= 1 and batch_size % process_count == 0,
        "batch_size",
        f"must be a positive multiple of process_count={process_count}",
      ),
      (0 <= process_index < process_count, "process_index", f"must be in [0, {process_count})"),
      (isinstance(seed, (int, np.integer)) and seed >= 0, "seed", "must be an int >= 0"),
      (window_docs >= batch_size, "window_docs", f"must be >= batch_size={batch_size}"),
      (max_documents >= 0, "max_documents", "must be >= 0 (0: every document)"),
    ]
    for ok, name, rule in rules:
      if not ok:
        raise ValueError(f"{name}={locals()[name]!r} {rule}")
    self.docs = (
      data if isinstance(data, prepared_lib.PreparedDocs) else prepared_lib.PreparedDocs(data)
    )
    self.tokenizer = self.docs.tokenizer()
    is_eval = prepared_lib.held_out(self.docs.doc_hashes(), eval_fraction, split_seed)
    chosen = is_eval if split == "eval" else ~is_eval
    if max_documents:  # The corpus's first documents only; the split stays the hash's.
      chosen[max_documents:] = False
    index = np.int32 if self.docs.num_documents < 2**31 else np.int64
    self.doc_ids = np.flatnonzero(chosen).astype(index)
    if len(self.doc_ids) < 2:
      raise ValueError(
        f"split={split!r} holds {len(self.doc_ids)} document(s) of "
        f"{self.docs.num_documents}; NSP needs 2 (change eval_fraction or add data)"
      )
    self.view = prepared_lib.DocView(self.docs, self.doc_ids)
    self.batch_size, self.seq_len, self.max_predictions = batch_size, seq_len, max_predictions
    self.masking, self.seed, self.masked_lm_prob = masking, int(seed), masked_lm_prob
    self.whole_word, self.short_seq_prob = whole_word_masking, short_seq_prob
    self.num_epochs = num_epochs
    self.dupe_factor = dupe_factor or (_STATIC_DUPE_FACTOR if masking == "static" else 1)
    self.window_docs = window_docs
    self.num_windows = -(-len(self.doc_ids) // window_docs)
    local = batch_size // process_count
    self.local_rows = slice(process_index * local, (process_index + 1) * local)
    self._subword = self.tokenizer.subword_flags()
    self._order, self._plan = (None, None), (None, None)
    self.epoch = self.window = self.position = 0
    self.stats = {"rows": 0, "capped_rows": 0, "dropped_predictions": 0}
    if self.num_windows == 1 and len(self._window_plan()["doc"]) < batch_size:
      raise ValueError(
        f"batch_size={batch_size} exceeds the {len(self._plan[1]['doc'])} "
        f"instances of this {split} split ({len(self.doc_ids)} documents); lower "
        "batch_size or add data"
      )

  def __iter__(self):
    return self

  def _epoch_order(self) -> np.ndarray:
    if self._order[0] != self.epoch:
      rng = np.random.default_rng([self.seed, _ORDER_SEED, self.epoch])
      self._order = (self.epoch, rng.permutation(len(self.doc_ids)).astype(self.doc_ids.dtype))
    return self._order[1]

  def _window_plan(self) -> dict:
    """The window's instances as position spans, in batch order: {field: array[n]}."""
    key = (self.epoch, self.window)
    if self._plan[0] == key:
      return self._plan[1]
    w = self.window_docs
    members = self._epoch_order()[self.window * w : (self.window + 1) * w]
    k = self.epoch % self.dupe_factor
    flat, rng = array.array("q"), pair_generator(self.seed, k, 0)  # 8 bytes per value.
    for i in members.tolist():
      doc = int(self.doc_ids[i])
      pairs = []
      rng.bit_generator.state = _pcg64_state(self.seed, k, doc)  # = pair_generator(seed, k, doc)
      bert_data._document_pairs(self.view, i, self.seq_len - 3, self.short_seq_prob, rng, pairs)
      for j, (a, b, label) in enumerate(pairs):
        flat.extend((doc, j, a[0], len(a), b[0], len(b), label))
    table = np.frombuffer(flat, np.int64).reshape(-1, len(_PLAN_FIELDS))
    shuffle = np.random.default_rng([self.seed, _SHUFFLE_SEED, *key]).permutation(len(table))
    plan = dict(zip(_PLAN_FIELDS, table[shuffle].T))
    self._plan = (key, plan)
    return plan

  def _instances(self, plan: dict, rows: np.ndarray) -> bert_data.Instances:
    """Reads tokens of the chosen plan rows (i[b]) into `[CLS] A [SEP] B [SEP]` instances."""
    b, t = len(rows), self.seq_len
    a_len, b_len = plan["a_len"][rows], plan["b_len"][rows]
    tokens = np.zeros((b, t), np.int32)
    tokens[:, 0] = self.tokenizer.cls_id
    for r, (row, la, lb) in enumerate(zip(rows.tolist(), a_len.tolist(), b_len.tolist())):
      tokens[r, 1 : 1 + la] = self.docs.tokens(int(plan["a_start"][row]), la)
      tokens[r, 2 + la : 2 + la + lb] = self.docs.tokens(int(plan["b_start"][row]), lb)
      tokens[r, [1 + la, 2 + la + lb]] = self.tokenizer.sep_id
    lengths = (a_len + b_len + 3).astype(np.int32)
    column = np.arange(t)[None, :]
    segments = ((column >= a_len[:, None] + 2) & (column < lengths[:, None])).astype(np.int32)
    return bert_data.Instances(tokens, segments, lengths, plan["label"][rows].astype(np.int32))

  def _masks(self, plan: dict, rows: np.ndarray, inst: bert_data.Instances) -> dict:
    if self.masking == "static":
      keys = keyed_masks.row_keys(
        _STATIC_KEY, self.seed, self.epoch % self.dupe_factor, plan["doc"][rows], plan["pair"][rows]
      )
      return keyed_masks.mask_static(
        inst.tokens,
        inst.lengths,
        keys,
        self.tokenizer,
        max_predictions=self.max_predictions,
        masked_lm_prob=self.masked_lm_prob,
        whole_word=self.whole_word,
        subword_flags=self._subword,
      )
    global_rows = np.arange(self.local_rows.start, self.local_rows.stop)
    keys = keyed_masks.row_keys(
      _DYNAMIC_KEY, self.seed, self.epoch, self.window, self.position, global_rows
    )
    draws = keyed_masks.dynamic_draws(
      keys, self.seq_len, self.max_predictions, self.tokenizer.vocab_size
    )
    maskable = bert_data.maskable_positions(inst.tokens, inst.lengths, self.tokenizer.special_ids)
    out = bert_data.mask_dynamic(
      inst.tokens,
      maskable,
      draws,
      masked_lm_prob=self.masked_lm_prob,
      max_predictions=self.max_predictions,
      mask_id=self.tokenizer.mask_id,
    )
    bert_data.count_capped(self.stats, out.pop("num_drawn"), self.max_predictions)
    return out

  def __next__(self) -> dict:
    """This process's rows of the next global batch; advances the state."""
    while True:
      if self.num_epochs is not None and self.epoch >= self.num_epochs:
        raise StopIteration
      plan = self._window_plan()
      if (self.position + 1) * self.batch_size <= len(plan["doc"]):
        break
      self.window, self.position = self.window + 1, 0  # The window's tail (< B) is dropped.
      if self.window == self.num_windows:
        self.epoch, self.window = self.epoch + 1, 0
    start = self.position * self.batch_size
    rows = np.arange(start + self.local_rows.start, start + self.local_rows.stop)
    inst = self._instances(plan, rows)
    masks = self._masks(plan, rows, inst)
    self.position += 1
    return dict(
      input_ids=masks["input_ids"],
      segment_ids=inst.segment_ids,
      input_mask=inst.input_mask,
      masked_lm_positions=masks["masked_lm_positions"],
      masked_lm_ids=masks["masked_lm_ids"],
      masked_lm_weights=masks["masked_lm_weights"],
      next_sentence_labels=inst.next_sentence_labels,
      original_ids=inst.tokens,
    )

  def unigram_counts(self) -> np.ndarray:
    """i64[V]: token counts over this split's documents (for a unigram baseline)."""
    chosen = np.zeros(self.docs.num_documents, bool)
    chosen[self.doc_ids] = True
    return self.docs.token_counts(chosen, self.tokenizer.vocab_size)

  def _identity(self) -> dict:
    return dict(
      seed=self.seed,
      masking=self.masking,
      batch_size=self.batch_size,
      seq_len=self.seq_len,
      dupe_factor=self.dupe_factor,
      window_docs=self.window_docs,
      data=self.docs.fingerprint[:16],
      num_documents=len(self.doc_ids),
    )

  def get_state(self) -> dict:
    """JSON-serialisable and the same on every process: position plus what must match."""
    return dict(self._identity(), epoch=self.epoch, window=self.window, position=self.position)

  def set_state(self, state: dict) -> None:
    """Continues from `state`, saved with any process count; the rest must match."""
    for key, mine in self._identity().items():
      if state.get(key) != mine:
        raise ValueError(
          f"state[{key!r}]={state.get(key)!r} does not match this iterator's "
          f"{key}={mine!r}; restore into an iterator built the same way"
        )
    epoch, window, position = (int(state[k]) for k in ("epoch", "window", "position"))
    if epoch < 0 or not 0 <= window < self.num_windows or position < 0:
      raise ValueError(
        f"state={state} is out of range: window must be in "
        f"[0, {self.num_windows}), epoch and position >= 0"
      )
    self.epoch, self.window, self.position = epoch, window, position
