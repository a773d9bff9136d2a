"""A padded-sequence classifier whose masking points switch on and off one by one.

Conv front end -> batch norm -> ReLU -> GRU -> per-step logits and logits of the final carry,
the Keras `Masking()` stack in plain JAX. Each masking point of `Masking` is either mask-aware
(`layers.MaskedConv1D`, `layers.MaskedBatchNorm`, the padded scan's frozen carry) or the plain
layer that reads the padding, so that `experiments/padded_gru.py` can measure what each one
buys.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from maskax.masking import masks
from maskax.rnn import layers
from maskax.rnn.scan import PaddedRNN


@dataclasses.dataclass(frozen=True)
class Masking:
  """Which masking points are on (True = mask-aware)."""

  state: bool  # frozen carry past each length (padded_scan's step mask)
  loss: bool  # per-step loss over valid steps only (else over all T steps)
  batch_norm: bool  # MaskedBatchNorm (else nn.BatchNorm over every position)
  conv: bool  # MaskedConv1D (else nn.Conv reading and writing the padding)


class PaddedGRUClassifier(nn.Module):
  """Optional conv front end -> batch norm -> ReLU -> GRU -> per-step and final-carry logits."""

  masking: Masking
  classes: int = 4
  hidden: int = 32  # D
  conv_layers: int = 2
  conv_features: int = 16
  conv_kernel: int = 5
  bn_momentum: float = 0.9
  output_policy: str = "zero"

  @nn.compact
  def __call__(self, x, step_mask, *, train: bool):
    """x f32[B, T, F], step_mask bool[B, T] (True = counts; unused where masking is off).

    Returns (per-step logits f32[B, T, C], logits of the final carry f32[B, C]).
    """
    m, h = self.masking, x
    for i in range(self.conv_layers):
      if m.conv:
        h = layers.MaskedConv1D(self.conv_features, self.conv_kernel, name=f"conv{i}")(h, step_mask)
      else:
        h = nn.Conv(self.conv_features, (self.conv_kernel,), padding="SAME", name=f"conv{i}")(h)
      if i < self.conv_layers - 1:
        h = nn.relu(h)
    if m.batch_norm:
      h = layers.MaskedBatchNorm(momentum=self.bn_momentum, name="bn")(
        h, step_mask, use_running_average=not train
      )
      # relu(0) = 0 keeps the padding at 0 here; the remask states the contract for any
      # elementwise op that does not (sigmoid, +bias).
      h = layers.remask(nn.relu(h), step_mask)
    else:
      h = nn.relu(
        nn.BatchNorm(momentum=self.bn_momentum, use_running_average=not train, name="bn")(h)
      )
    carry, outputs = PaddedRNN("gru", self.hidden, output_policy=self.output_policy, name="gru")(
      h, mask=step_mask if m.state else None, return_carry=True
    )
    head = nn.Dense(self.classes, name="head")
    return head(outputs), head(carry)


def apply(model: PaddedGRUClassifier, params, model_state, x, step_mask, *, train: bool):
  """(step logits f32[B, T, C], final logits f32[B, C], new model_state).

  model_state: {"batch_stats": ...}; train=True normalises with batch statistics and returns
  the updated running statistics, train=False uses the running ones and returns model_state.
  """
  variables = {"params": params, **model_state}
  if not train:
    return (*model.apply(variables, x, step_mask, train=False), model_state)
  out, updates = model.apply(variables, x, step_mask, train=True, mutable=["batch_stats"])
  return (*out, {**model_state, **updates})


def make_classifier(model: PaddedGRUClassifier):
  """`classify(params, model_state, x f32[B, T, F], lengths i32[B]) -> probs f32[B, C]` on the
  host: class probabilities from the carry at each row's last valid step, jitted once per
  shape, running statistics for batch norm."""

  @jax.jit
  def probs(params, model_state, x, lengths):
    valid = masks.sequence_mask(lengths, x.shape[1])
    return jax.nn.softmax(apply(model, params, model_state, x, valid, train=False)[1])

  return lambda params, model_state, x, lengths: np.asarray(probs(params, model_state, x, lengths))
