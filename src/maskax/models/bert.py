"""BERT encoder with NSP and a masked-LM head run on gathered positions only.

Follows google-research/bert `modeling.py` (post-LN encoder, tanh pooler on [CLS]) and
`run_pretraining.py` (`gather_indexes`: the MLM transform and the vocab projection run on the
P masked positions of each sequence, not on all T). The output projection is tied to the token
embedding table and has its own f32 bias. Padding is given by `input_mask` (True = real token);
padded keys are never attended, and garbage ids at padded positions never reach valid outputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_PRESETS = {  # name: (num_layers, hidden, num_heads, intermediate)
  "smoke": (1, 32, 2, 64),
  "tiny": (2, 128, 2, 512),
  "mini": (4, 256, 4, 1024),
  "base": (12, 768, 12, 3072),
}
HEAD_MODES = ("gathered", "full")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes and options of a BERT model; `dtype` is the compute dtype (params stay f32)."""

  vocab_size: int
  hidden: int
  num_layers: int
  num_heads: int
  intermediate: int
  max_position: int = 512
  type_vocab: int = 2
  dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-12
  # True: tanh-approximate GELU (google-research/bert `modeling.gelu`, HF "gelu_new");
  # False: exact erf GELU (HF "gelu"), for checkpoints trained with it.
  gelu_approximate: bool = True

  def __post_init__(self):
    if self.hidden % self.num_heads:
      raise ValueError(
        f"hidden={self.hidden} must be divisible by num_heads={self.num_heads}; "
        "pick a head count that divides the width."
      )

  @classmethod
  def preset(cls, name: str, vocab_size: int, **overrides) -> "BertConfig":
    """Named size (`smoke`, `tiny`, `mini`, `base`) for a vocabulary; overrides win."""
    if name not in _PRESETS:
      raise ValueError(f"preset name={name!r} is unknown; choose one of {sorted(_PRESETS)}.")
    layers, hidden, heads, inter = _PRESETS[name]
    sizes = dict(num_layers=layers, hidden=hidden, num_heads=heads, intermediate=inter)
    return cls(vocab_size=vocab_size, **{**sizes, **overrides})


def _init(config: BertConfig):
  return nn.initializers.truncated_normal(config.initializer_range)


def gather_positions(x, positions):
  """Rows of `x` at `positions` per sequence (google-research/bert `gather_indexes`).

  x: f32[B, T, D]; positions: i32[B, P] -> f32[B, P, D]. Out-of-range positions (unused
  prediction slots may hold anything; their weight is 0) are clipped so they stay finite.
  """
  return jnp.take_along_axis(x, positions[:, :, None], axis=1, mode="clip")


class SelfAttention(nn.Module):
  """Multi-head self-attention in which padded keys get exactly zero weight."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, input_mask, *, train: bool):
    """x: f32[B, T, D]; input_mask: bool[B, T] (True = real key) -> f32[B, T, D]."""
    cfg = self.config
    heads, head_dim = cfg.num_heads, cfg.hidden // cfg.num_heads
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
      (heads, head_dim), dtype=cfg.dtype, kernel_init=_init(cfg), name=name
    )
    q_BTHK, k_BTHK, v_BTHK = proj("query")(x), proj("key")(x), proj("value")(x)
    scores_BHTT = jnp.einsum(
      "bqhk,bthk->bhqt", q_BTHK, k_BTHK, preferred_element_type=jnp.float32
    ) / math.sqrt(head_dim)
    key_mask = input_mask[:, None, None, :]
    # A finite fill (not -inf) keeps a fully padded row finite: its softmax is uniform
    # instead of 0/0. The second `where` then zeroes it, so every padded key gets exactly 0.
    scores_BHTT = jnp.where(key_mask, scores_BHTT, jnp.finfo(jnp.float32).min)
    probs_BHTT = jnp.where(key_mask, jax.nn.softmax(scores_BHTT, axis=-1), 0.0)
    probs_BHTT = nn.Dropout(cfg.attention_dropout)(probs_BHTT, deterministic=not train)
    ctx_BTHK = jnp.einsum("bhqt,bthk->bqhk", probs_BHTT.astype(cfg.dtype), v_BTHK)
    return nn.DenseGeneral(
      cfg.hidden, axis=(-2, -1), dtype=cfg.dtype, kernel_init=_init(cfg), name="out"
    )(ctx_BTHK)


class EncoderLayer(nn.Module):
  """Post-LN Transformer layer: x = LN(x + attn(x)); x = LN(x + FFN(x)), GELU FFN."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, input_mask, *, train: bool):
    """x: f32[B, T, D]; input_mask: bool[B, T] -> f32[B, T, D]."""
    cfg = self.config
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name=name)  # noqa: E731
    drop = nn.Dropout(cfg.dropout)
    attn = SelfAttention(cfg, name="attention")(x, input_mask, train=train)
    x = norm("attention_norm")(x + drop(attn, deterministic=not train))
    h = nn.Dense(cfg.intermediate, dtype=cfg.dtype, kernel_init=_init(cfg), name="ffn_in")(x)
    h = nn.Dense(cfg.hidden, dtype=cfg.dtype, kernel_init=_init(cfg), name="ffn_out")(
      nn.gelu(h, approximate=cfg.gelu_approximate)
    )
    return norm("ffn_norm")(x + drop(h, deterministic=not train))


class MlmHead(nn.Module):
  """Masked-LM head: dense + GELU + LayerNorm, then the tied embedding plus an f32 bias."""

  config: BertConfig

  @nn.compact
  def __call__(self, h, embedding):
    """h: f32[..., D] (any leading dims); embedding: f32[V, D] (tied) -> f32[..., V]."""
    cfg = self.config
    h = nn.Dense(cfg.hidden, dtype=cfg.dtype, kernel_init=_init(cfg), name="transform")(h)
    h = nn.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="transform_norm")(
      nn.gelu(h, approximate=cfg.gelu_approximate)
    )
    bias = self.param("output_bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
    # Compute-dtype inputs, f32 accumulation and result: logits feed a softmax over V.
    logits = jnp.einsum(
      "...d,vd->...v",
      h.astype(cfg.dtype),
      embedding.astype(cfg.dtype),
      preferred_element_type=jnp.float32,
    )
    return logits + bias.reshape((1,) * (logits.ndim - 1) + (-1,))


def _check_inputs(config, input_ids, segment_ids, input_mask, masked_positions, mlm_head):
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be i32[B, T], got shape {input_ids.shape}.")
  for name, arr in (("segment_ids", segment_ids), ("input_mask", input_mask)):
    if arr.shape != input_ids.shape:
      raise ValueError(f"{name} has shape {arr.shape}; it must match input_ids {input_ids.shape}.")
  if input_mask.dtype != jnp.bool_:
    raise ValueError(
      f"input_mask must be bool (True = real token), got {input_mask.dtype}; "
      "pass `input_ids != pad_id` or a mask built from lengths."
    )
  if input_ids.shape[1] > config.max_position:
    raise ValueError(
      f"input_ids has T={input_ids.shape[1]} > max_position={config.max_position}; "
      "truncate the sequences or raise BertConfig.max_position."
    )
  if mlm_head not in HEAD_MODES:
    raise ValueError(f"mlm_head={mlm_head!r} is unknown; choose one of {HEAD_MODES}.")
  if mlm_head == "gathered":
    if masked_positions is None:
      raise ValueError(
        "mlm_head='gathered' needs masked_positions i32[B, P]; pass them or use mlm_head='full'."
      )
    if masked_positions.ndim != 2 or masked_positions.shape[0] != input_ids.shape[0]:
      raise ValueError(
        f"masked_positions must be i32[B, P] with B={input_ids.shape[0]}, "
        f"got shape {masked_positions.shape}."
      )


class Bert(nn.Module):
  """BERT for pretraining: encoder, NSP head on the pooled [CLS], tied MLM head."""

  config: BertConfig

  @nn.compact
  def __call__(
    self,
    input_ids,
    segment_ids,
    input_mask,
    masked_positions=None,
    *,
    train: bool,
    mlm_head: str = "gathered",
  ):
    """Run the encoder and both pretraining heads.

    input_ids, segment_ids: i32[B, T]; input_mask: bool[B, T] (True = real token);
    masked_positions: i32[B, P], or None with mlm_head='full'.
    Returns dict(mlm_logits=f32[B, P, V] ('gathered') or f32[B, T, V] ('full'),
    nsp_logits=f32[B, 2] (label 1 = random next segment), sequence_output=f32[B, T, D]).
    Dropout (train=True) needs a 'dropout' rng.
    """
    cfg = self.config
    _check_inputs(cfg, input_ids, segment_ids, input_mask, masked_positions, mlm_head)
    seq_len = input_ids.shape[1]
    # Safe ids first: padded slots may hold anything, even ids outside the table, whose
    # gather would be NaN (jnp.take fills) and reach valid rows through 0 * NaN.
    input_ids = jnp.where(input_mask, input_ids, 0)
    segment_ids = jnp.where(input_mask, segment_ids, 0)

    token_embed = nn.Embed(
      cfg.vocab_size,
      cfg.hidden,
      dtype=cfg.dtype,
      embedding_init=_init(cfg),
      name="token_embed",
    )
    position_table = self.param(
      "position_embed", _init(cfg), (cfg.max_position, cfg.hidden), jnp.float32
    )
    segment_embed = nn.Embed(
      cfg.type_vocab,
      cfg.hidden,
      dtype=cfg.dtype,
      embedding_init=_init(cfg),
      name="segment_embed",
    )
    x = token_embed(input_ids) + segment_embed(segment_ids)
    x = x + position_table[None, :seq_len].astype(cfg.dtype)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="embed_norm")(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, input_mask, train=train)

    pooled = nn.tanh(
      nn.Dense(cfg.hidden, dtype=cfg.dtype, kernel_init=_init(cfg), name="pooler")(x[:, 0])
    )
    nsp_logits = nn.Dense(2, dtype=cfg.dtype, kernel_init=_init(cfg), name="nsp")(pooled)
    h = gather_positions(x, masked_positions) if mlm_head == "gathered" else x
    mlm_logits = MlmHead(cfg, name="mlm")(h, token_embed.embedding)
    return dict(
      mlm_logits=mlm_logits,
      nsp_logits=nsp_logits.astype(jnp.float32),
      sequence_output=x.astype(jnp.float32),
    )


# Leaf names that AdamW's weight decay skips: google-research/bert `optimization.py` excludes
# every "LayerNorm" and "bias" variable; here those are LayerNorm `scale`/`bias`, the Dense
# biases and the MLM `output_bias`. Embedding tables and kernels are decayed, as there.
_NO_DECAY = ("bias", "scale", "output_bias")


def weight_decay_mask(params) -> Any:
  """Pytree of bools like `params`: True where AdamW applies weight decay (for optax's
  `adamw(..., mask=weight_decay_mask)`)."""
  return jax.tree.map_with_path(
    lambda path, _: getattr(path[-1], "key", None) not in _NO_DECAY, params
  )


def param_count(config: BertConfig) -> int:
  """Number of parameters of `Bert(config)` (tied output embedding counted once)."""
  d, i, v = config.hidden, config.intermediate, config.vocab_size
  embeddings = (v + config.max_position + config.type_vocab) * d + 2 * d
  layer = 4 * (d * d + d) + 2 * d + (d * i + i) + (i * d + d) + 2 * d
  heads = (d * d + d) + (2 * d + 2) + (d * d + d + 2 * d + v)  # pooler, NSP, MLM
  return embeddings + config.num_layers * layer + heads


def train_flops_per_sequence(
  config: BertConfig, seq_len: int, predictions: int, mlm_head: str = "gathered"
) -> int:
  """Matmul FLOPs of one training step (forward + backward = 3x forward) per sequence.

  Counts the dense layers, the two attention products (scores and weighted values, T^2 D each
  per layer) and the MLM head on `predictions` slots (`gathered`) or all `seq_len` positions
  (`full`); embeddings lookups, softmax, LayerNorm and the pooler/NSP head are left out (<1%
  for BERT-base). This is the "model FLOPs" of MFU: work the model needs, not work XLA did.
  """
  d, i, v, t = config.hidden, config.intermediate, config.vocab_size, seq_len
  per_layer = 2 * t * (4 * d * d + 2 * d * i) + 2 * 2 * t * t * d
  head_rows = predictions if mlm_head == "gathered" else t
  head = 2 * head_rows * (d * d + d * v)
  return 3 * (config.num_layers * per_layer + head)
