"""A character-level recurrent language model: embedding -> stacked GRU/LSTM -> dense to V.

The recurrence does not depend on the number of steps, so a model trained on windows of 100
characters runs on a prompt of any length; only batching needs equal lengths, and a padded
batch (lengths per row, carry frozen past each length, `maskax.rnn.scan.padded_scan`) removes even
that. What gives context beyond one window is the carry: `stream_xent` measures held-out loss
with the carry reset at every window and carried across the whole text, and `generate` samples
from the carry a prompt leaves behind.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskax.data import chars
from maskax.masking import losses, sampling
from maskax.rnn import cells
from maskax.rnn.scan import StackedRNN


class CharRNN(nn.Module):
  """Embedding -> `num_layers` padded GRU/LSTM layers -> dense logits over V characters.

  __call__: tokens i32[B, T], lengths i32[B] or None (all T), initial_carry a list per layer of
  f32[B, D] (LSTM: (c, h)) or None (zeros). Returns (logits f32[B, T, V], list of final carries,
  each the carry after the row's last valid step). Dropout draws from the 'dropout' RNG stream.
  """

  vocab_size: int
  embed_dim: int = 64
  hidden: int = 256
  num_layers: int = 1
  cell: str = "gru"
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens, lengths=None, *, initial_carry=None, deterministic=True):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be i32[B, T], got {tokens.dtype}{list(tokens.shape)}.")
    x_BTF = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    carries, h_BTD = StackedRNN(
      self.cell, self.hidden, self.num_layers, dropout_rate=self.dropout_rate, name="rnn"
    )(x_BTF, lengths, initial_carry=initial_carry, deterministic=deterministic, return_carry=True)
    return nn.Dense(self.vocab_size, name="logits")(h_BTD), carries

  def zero_carry(self, batch: int) -> list:
    """One zero carry per layer: f32[B, D] (LSTM: (c, h))."""
    return [cells.zero_carry(self.cell, (batch,), self.hidden) for _ in range(self.num_layers)]


def reset_carry(carry, reset):
  """Zeros the carry of the rows where `reset` is True.

  carry: list per layer of f32[B, D] (LSTM: (c, h)); reset: bool[B]. Returns the same shapes.
  """
  return jax.tree.map(lambda c: jnp.where(reset[:, None], jnp.zeros_like(c), c), carry)


def make_apply_fn(model: CharRNN):
  """`apply_fn(params, tokens i32[B, T], lengths i32[B], carry) -> (logits f32[B, T, V], carry)`,
  the contract of `maskax.masking.sampling.generate`."""

  def apply_fn(params, tokens, lengths, carry):
    return model.apply({"params": params}, tokens, lengths, initial_carry=carry)

  return apply_fn


row_keys = sampling.row_keys  # kept here too: the experiment and its tests use this name


def generate(
  model: CharRNN,
  params,
  prompt,
  lengths,
  keys,
  *,
  steps: int,
  temperature=1.0,
  top_k: int = 0,
  banned=None,
  carry=None,
  start_step=0,
):
  """Samples `steps` characters after each prompt; a row's text depends on its prompt and key.

  prompt: i32[B, T] right-padded; lengths: i32[B] in [1, T]; keys: key[B] (`row_keys`);
  carry: list per layer of f32[B, D] or None (zeros); banned: bool[V] (the unknown id).
  Returns (tokens i32[B, steps], carry), the carry as in `maskax.masking.sampling.generate` (it has not
  consumed the last token). With one key per row, a prompt with a given key gives the same text
  alone or in any ragged batch; a shared [B, V] draw would tie each row's noise to its batch.
  Jit with `steps` and `top_k` static; the sampling loop inside is one `lax.scan`.
  """
  prompt, lengths = jnp.asarray(prompt), jnp.asarray(lengths)
  if prompt.ndim != 2 or lengths.shape != prompt.shape[:1]:
    raise ValueError(
      f"prompt must be i32[B, T] and lengths i32[B], got {prompt.shape} and "
      f"{lengths.shape}; build them with chars.pad_prompts."
    )
  if keys.shape != prompt.shape[:1]:
    raise ValueError(
      f"keys must hold one key per row (key[{prompt.shape[0]}]), got shape "
      f"{keys.shape}; use row_keys(key, batch)."
    )
  if carry is None:
    carry = model.zero_carry(prompt.shape[0])
  return sampling.generate(
    make_apply_fn(model),
    params,
    prompt,
    lengths,
    carry,
    steps,
    keys,
    temperature=temperature,
    top_k=top_k,
    banned=banned,
    start_step=start_step,
  )


def stream_xent(model: CharRNN, params, inputs, targets, mask=None):
  """Held-out cross-entropy of contiguous streams, carry reset per window vs carried across.

  inputs, targets: i32[B, K, T] from `maskax.data.chars.stream_windows` (window k + 1 of row b
  continues window k); mask: bool[B, K, T] or None (all count). Returns
  {"reset": (total, weight), "carried": (total, weight)} in nats: `reset` starts every window
  from a zero carry (context at most T characters), `carried` passes each window's final carry
  to the next (context = everything before it in the stream). Same targets, one `lax.scan`.
  """
  inputs, targets = jnp.asarray(inputs), jnp.asarray(targets)
  if inputs.ndim != 3 or inputs.shape != targets.shape:
    raise ValueError(
      f"inputs and targets must both be i32[B, K, T], got {inputs.shape} and "
      f"{targets.shape}; build them with chars.stream_windows."
    )
  batch = inputs.shape[0]
  mask = jnp.ones(inputs.shape, bool) if mask is None else jnp.asarray(mask)
  zeros = model.zero_carry(batch)

  def window(state, xs):
    carry, sums = state
    x_BT, y_BT, m_BT = xs
    logits_reset, _ = model.apply({"params": params}, x_BT, initial_carry=zeros)
    logits_carried, carry = model.apply({"params": params}, x_BT, initial_carry=carry)
    reset = losses.masked_xent(logits_reset, y_BT, m_BT)
    carried = losses.masked_xent(logits_carried, y_BT, m_BT)
    sums = jax.tree.map(jnp.add, sums, {"reset": reset, "carried": carried})
    return (carry, sums), None

  zero_pair = (jnp.float32(0.0), jnp.float32(0.0))
  init = (zeros, {"reset": zero_pair, "carried": zero_pair})
  xs = tuple(jnp.swapaxes(a, 0, 1) for a in (inputs, targets, mask))
  (_, sums), _ = jax.lax.scan(window, init, xs)
  return sums


def bits_per_char(nats_total, weight):
  """(total nats, weight) -> (total bits, weight): the pair a loop averages into bits/char."""
  return nats_total / math.log(2.0), weight


def make_sampler(model: CharRNN, vocab: chars.CharVocab, *, temperature: float, top_k: int):
  """`sample(params, prompts, steps, key) -> list of str`: `generate` jitted (once per number
  of steps and prompt shape) on a ragged batch of prompts, row keys split from `key`; the
  unknown character is never sampled."""
  gen = jax.jit(functools.partial(generate, model), static_argnames=("steps", "top_k"))

  def sample(params, prompts, steps, key):
    ids, lengths = chars.pad_prompts(prompts, vocab)
    keys = row_keys(key, len(prompts))
    tokens, _ = gen(
      params,
      ids,
      lengths,
      keys,
      steps=steps,
      temperature=temperature,
      top_k=top_k,
      banned=vocab.banned(),
    )
    return [vocab.decode(row) for row in np.asarray(tokens)]

  return sample


def make_eval_sums(model: CharRNN):
  """The training loop's `eval_sums` over `stream_windows` batches (inputs, targets
  i32[B, K, T]): xent and bits/char pairs with the carry reset per window (`_reset`) and
  carried across (`_carried`)."""

  def eval_sums(params, model_state, batch, key):
    del model_state, key
    sums = stream_xent(model, params, batch["inputs"], batch["targets"])
    return {
      **{f"xent_{k}": pair for k, pair in sums.items()},
      **{f"bpc_{k}": bits_per_char(*pair) for k, pair in sums.items()},
    }

  return eval_sums


@functools.partial(jax.jit, static_argnums=(0, 3))
def continuation_bpc(model: CharRNN, params, segments, context: int):
  """Held-out bits/char of a continuation after a reset state vs after a long context.

  segments: i32[B, C + L + 1], the first C = `context` characters the context. Scores the
  characters segments[:, C:] by teacher forcing: `reset` reads only the last context character
  from a zero carry, `carried` reads the whole context first. Returns {reset, carried}: f32[].
  Jitted (the model and `context` static).
  """
  inputs, targets = segments[:, :-1], segments[:, 1:]
  after = jnp.arange(inputs.shape[1])[None, :] >= context - 1
  mask = jnp.broadcast_to(after, inputs.shape)
  logits, _ = model.apply({"params": params}, inputs)
  carried = losses.masked_xent(logits, targets, mask)
  logits, _ = model.apply({"params": params}, inputs[:, context - 1 :])
  reset = losses.masked_xent(logits, targets[:, context - 1 :], mask[:, context - 1 :])
  return {
    name: losses.safe_div(*pair) / np.log(2.0)
    for name, pair in (("reset", reset), ("carried", carried))
  }
