"""Using a pretrained BERT: fill `[MASK]` slots with ranked tokens, score a next sentence.

Both run the model exactly as pretraining did (`Bert`, gathered MLM head, eval mode), on a
batch padded to the longest input; padded keys get zero attention weight, so a sentence's
answer does not depend on what else is in the batch. Letters: B inputs, T tokens, P `[MASK]`
slots per input (the most in the batch), V vocabulary, K `top_k`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maskax.models import bert

# A sentence pair on one line: "first sentence ||| candidate next sentence".
PAIR_SEPARATOR = "|||"


def _encode(tokenizer, texts: list[str], max_len: int):
  """[CLS] A [SEP] (B [SEP]) for each text -> ids, segments, mask (NumPy, [B, T])."""
  rows, segments = [], []
  for text in texts:
    first, _, second = text.partition(PAIR_SEPARATOR)
    a = tokenizer.encode(first.strip())
    ids, seg = [tokenizer.cls_id] + a + [tokenizer.sep_id], [0] * (len(a) + 2)
    if second.strip():
      b = tokenizer.encode(second.strip())
      ids, seg = ids + b + [tokenizer.sep_id], seg + [1] * (len(b) + 1)
    if len(ids) > max_len:
      raise ValueError(
        f"input {text[:60]!r} is {len(ids)} tokens long, more than the model's "
        f"{max_len} positions; shorten it."
      )
    rows.append(ids)
    segments.append(seg)
  T = max(len(r) for r in rows)
  pad = lambda r: r + [0] * (T - len(r))  # noqa: E731
  ids = np.asarray([pad(r) for r in rows], np.int32)
  return ids, np.asarray([pad(s) for s in segments], np.int32), ids != 0


def _run(model: bert.Bert, params, ids, segments, mask, positions):
  out = model.apply(
    {"params": params},
    jnp.asarray(ids),
    jnp.asarray(segments),
    jnp.asarray(mask),
    jnp.asarray(positions),
    train=False,
  )
  return jax.device_get(out)


def fill_mask(
  model: bert.Bert, params, tokenizer, texts: list[str], *, top_k: int = 5
) -> list[list[list[tuple[str, float]]]]:
  """For each text, for each `[MASK]` in it, the `top_k` (token, probability) pairs, best first.

  A text without `[MASK]` is a ValueError naming it (there is nothing to fill).
  """
  if not texts:
    raise ValueError("no input sentences: give at least one line with [MASK] in it.")
  ids, segments, mask = _encode(tokenizer, texts, model.config.max_position)
  slots = [np.flatnonzero(row == tokenizer.mask_id) for row in ids]
  for text, found in zip(texts, slots):
    if not len(found):
      raise ValueError(
        f"input {text[:60]!r} has no [MASK] token to fill; write [MASK] where "
        "a word should be predicted."
      )
  P = max(len(s) for s in slots)
  positions = np.zeros((len(texts), P), np.int32)
  for i, s in enumerate(slots):
    positions[i, : len(s)] = s
  logits = _run(model, params, ids, segments, mask, positions)["mlm_logits"]  # [B, P, V]
  probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
  top = np.argsort(-probs, axis=-1)[..., :top_k]  # [B, P, K]
  return [
    [
      [(tokenizer.id_to_token(t), float(probs[i, j, t])) for t in top[i, j]]
      for j in range(len(slots[i]))
    ]
    for i in range(len(texts))
  ]


def next_sentence_probability(model: bert.Bert, params, tokenizer, pairs: list[str]) -> list[float]:
  """P(B follows A) for each `"A ||| B"` line (the NSP head's class 0: label 1 = random)."""
  if not pairs:
    raise ValueError("no input pairs: give lines of the form 'first ||| second'.")
  for text in pairs:
    if PAIR_SEPARATOR not in text or not text.partition(PAIR_SEPARATOR)[2].strip():
      raise ValueError(
        f"input {text[:60]!r} is not a pair; write 'first sentence "
        f"{PAIR_SEPARATOR} second sentence'."
      )
  ids, segments, mask = _encode(tokenizer, pairs, model.config.max_position)
  positions = np.zeros((len(pairs), 1), np.int32)  # the MLM head is not read here
  logits = _run(model, params, ids, segments, mask, positions)["nsp_logits"]
  return [float(p) for p in np.asarray(jax.nn.softmax(logits, axis=-1))[:, 0]]


def predict_lines(model: bert.Bert, params, tokenizer, lines: list[str], *, top_k: int = 5):
  """One record per line: `{"input", "masks"}` (`fill_mask`'s slots) for a line with [MASK],
  `{"input", "is_next_probability"}` for a 'first ||| second' line."""
  out = []
  for line in lines:
    if PAIR_SEPARATOR in line:
      (p,) = next_sentence_probability(model, params, tokenizer, [line])
      out.append({"input": line, "is_next_probability": p})
    else:
      (slots,) = fill_mask(model, params, tokenizer, [line], top_k=top_k)
      out.append({"input": line, "masks": slots})
  return out
