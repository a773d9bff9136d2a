"""Tests for maskax.models.bert: shapes, gathered == full head, padding, ties, bf16."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskax.models import bert

V, B, T, P = 50, 3, 8, 4
CFG = bert.BertConfig(
  vocab_size=V, hidden=32, num_layers=2, num_heads=2, intermediate=32, max_position=16
)


def _batch(lengths, seq_len=T, seed=0):
  """Random batch: ids, segments, mask, P sorted positions inside each row, labels, weights."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  mask = np.arange(seq_len)[None, :] < lengths[:, None]
  ids = np.where(mask, rng.integers(1, V, (len(lengths), seq_len)), 0)
  segs = np.where(mask & (np.arange(seq_len)[None, :] >= lengths[:, None] // 2), 1, 0)
  positions = np.zeros((len(lengths), P), np.int32)
  weights = np.zeros((len(lengths), P), np.float32)
  for b, n in enumerate(lengths):
    k = min(P - 1, n)  # leave >= 1 unused slot (position 0, weight 0), as the data does
    positions[b, :k] = np.sort(rng.choice(n, k, replace=False))
    weights[b, :k] = 1.0
  labels = rng.integers(0, V, (len(lengths), P))
  as_j = lambda a, dt: jnp.asarray(a, dt)  # noqa: E731
  return dict(
    ids=as_j(ids, jnp.int32),
    segs=as_j(segs, jnp.int32),
    mask=jnp.asarray(mask),
    positions=as_j(positions, jnp.int32),
    labels=as_j(labels, jnp.int32),
    weights=as_j(weights, jnp.float32),
  )


@pytest.fixture(scope="module")
def batch():
  return _batch([8, 5, 3])


@pytest.fixture(scope="module")
def params(batch):
  b = batch
  variables = bert.Bert(CFG).init(
    jax.random.key(0), b["ids"], b["segs"], b["mask"], b["positions"], train=False
  )
  return variables["params"]


@functools.partial(jax.jit, static_argnames=("config", "train", "mlm_head"))
def _apply(params, ids, segs, mask, positions, *, config=CFG, train=False, mlm_head="gathered"):
  return bert.Bert(config).apply(
    {"params": params}, ids, segs, mask, positions, train=train, mlm_head=mlm_head
  )


def _mlm_nsp_loss(params, b, mlm_head):
  """Weighted masked-LM cross-entropy (token mean) plus NSP (label 0) mean; inline optax."""
  out = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"], mlm_head=mlm_head)
  logits = out["mlm_logits"]
  if mlm_head == "full":
    logits = bert.gather_positions(logits, b["positions"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"])
  mlm = jnp.sum(jnp.where(b["weights"] > 0, ce, 0.0) * b["weights"]) / jnp.sum(b["weights"])
  nsp = optax.softmax_cross_entropy_with_integer_labels(
    out["nsp_logits"], jnp.zeros(out["nsp_logits"].shape[:1], jnp.int32)
  )
  return mlm, jnp.mean(nsp)


def _loss(params, b, mlm_head="gathered"):
  return sum(_mlm_nsp_loss(params, b, mlm_head))


_mlm_value_and_grad = jax.jit(
  jax.value_and_grad(lambda p, b, mode: _mlm_nsp_loss(p, b, mode)[0]), static_argnums=2
)
_total_value_and_grad = jax.jit(jax.value_and_grad(_loss))


def _close(a, b, tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("mlm_head,mlm_len", [("gathered", P), ("full", T)])
def test_output_shapes_and_dtypes(params, batch, mlm_head, mlm_len):
  b = batch
  out = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"], mlm_head=mlm_head)
  assert out["mlm_logits"].shape == (B, mlm_len, V)
  assert out["nsp_logits"].shape == (B, 2)
  assert out["sequence_output"].shape == (B, T, CFG.hidden)
  assert all(a.dtype == jnp.float32 for a in out.values())


def test_gathered_head_equals_full_head_logits_loss_and_grads(params, batch):
  b = batch
  gathered = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"])["mlm_logits"]
  full = _apply(params, b["ids"], b["segs"], b["mask"], None, mlm_head="full")["mlm_logits"]
  _close(gathered, bert.gather_positions(full, b["positions"]), 1e-5)
  loss_g, grads_g = _mlm_value_and_grad(params, b, "gathered")
  loss_f, grads_f = _mlm_value_and_grad(params, b, "full")
  _close(loss_g, loss_f, 1e-5)
  _close(grads_g, grads_f, 1e-5)
  assert float(jnp.abs(grads_g["mlm"]["output_bias"]).sum()) > 0  # the loss reaches the head


def test_jit_equals_eager(params, batch):
  b = batch
  eager = bert.Bert(CFG).apply(
    {"params": params}, b["ids"], b["segs"], b["mask"], b["positions"], train=False
  )
  _close(eager, _apply(params, b["ids"], b["segs"], b["mask"], b["positions"]), 1e-5)


def _with_garbage(b, extra, seed=1):
  """Same batch with garbage ids/segments at padded slots and `extra` padded slots appended."""
  rng = np.random.default_rng(seed)
  mask = jnp.pad(b["mask"], ((0, 0), (0, extra)))
  junk = lambda lo, hi: jnp.asarray(rng.integers(lo, hi, mask.shape), jnp.int32)  # noqa: E731
  # Out-of-range ids too: an unguarded embedding gather would give NaN there.
  ids = jnp.where(mask, jnp.pad(b["ids"], ((0, 0), (0, extra))), junk(-7, 10 * V))
  segs = jnp.where(mask, jnp.pad(b["segs"], ((0, 0), (0, extra))), junk(0, 9))
  return dict(b, ids=ids, segs=segs, mask=mask)


def test_padding_invariance_outputs_and_grads(params, batch):
  b, padded = batch, _with_garbage(batch, extra=4)
  out = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"])
  out_p = _apply(params, padded["ids"], padded["segs"], padded["mask"], padded["positions"])
  valid = b["mask"][:, :, None]
  _close(
    jnp.where(valid, out["sequence_output"], 0.0),
    jnp.where(valid, out_p["sequence_output"][:, :T], 0.0),
    1e-5,
  )
  _close(out["nsp_logits"], out_p["nsp_logits"], 1e-5)
  _close(out["mlm_logits"], out_p["mlm_logits"], 1e-5)
  _close(_total_value_and_grad(params, b), _total_value_and_grad(params, padded), 1e-5)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
  lengths=st.lists(st.integers(0, T), min_size=B, max_size=B), seed=st.integers(0, 2**16)
)
def test_garbage_at_padded_slots_never_reaches_valid_outputs(params, lengths, seed):
  b = _batch(lengths, seed=seed)
  g = _with_garbage(b, extra=0, seed=seed + 1)
  out = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"])
  out_g = _apply(params, g["ids"], g["segs"], g["mask"], g["positions"])
  valid = b["mask"][:, :, None]
  np.testing.assert_array_equal(
    jnp.where(valid, out["sequence_output"], 0.0), jnp.where(valid, out_g["sequence_output"], 0.0)
  )
  np.testing.assert_array_equal(out["nsp_logits"], out_g["nsp_logits"])


def test_fully_padded_row_is_finite_with_finite_grads(params, batch):
  b = _batch([8, 0, 4])
  out = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"])
  for name in ("mlm_logits", "nsp_logits", "sequence_output"):
    assert bool(jnp.isfinite(out[name]).all()), name
  loss, grads = _total_value_and_grad(params, b)
  assert bool(jnp.isfinite(loss))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  # Row 0 holds the same tokens as in `batch` (same seed, same length); the empty row
  # beside it must not change it.
  np.testing.assert_array_equal(b["ids"][0], batch["ids"][0])
  ref = _apply(params, batch["ids"], batch["segs"], batch["mask"], batch["positions"])
  _close(out["sequence_output"][0], ref["sequence_output"][0], 1e-5)


def test_mlm_output_is_tied_to_token_embedding(params, batch):
  b = batch
  is_transform_norm = lambda mdl, _: mdl.name == "transform_norm"  # noqa: E731
  out, state = bert.Bert(CFG).apply(
    {"params": params},
    b["ids"],
    b["segs"],
    b["mask"],
    b["positions"],
    train=False,
    capture_intermediates=is_transform_norm,
    mutable=["intermediates"],
  )
  (h,) = state["intermediates"]["mlm"]["transform_norm"]["__call__"]
  table, bias = params["token_embed"]["embedding"], params["mlm"]["output_bias"]
  _close(out["mlm_logits"], jnp.einsum("bpd,vd->bpv", h, table) + bias[None, None], 1e-5)
  vocab_sized = [p.shape for p in jax.tree.leaves(params) if V in p.shape]
  assert sorted(vocab_sized) == [(V,), (V, CFG.hidden)]  # one table, one output bias


def test_param_count_matches_formula(params):
  assert sum(p.size for p in jax.tree.leaves(params)) == bert.param_count(CFG)
  # BERT-base (uncased, V=30522) for pretraining: 110,106,428 (HF BertForPreTraining).
  assert bert.param_count(bert.BertConfig.preset("base", 30522)) == 110_106_428


def test_bf16_compute_returns_f32_logits(params, batch):
  b = batch
  cfg16 = bert.BertConfig(**{**CFG.__dict__, "dtype": jnp.bfloat16})
  out16 = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"], config=cfg16)
  out32 = _apply(params, b["ids"], b["segs"], b["mask"], b["positions"])
  for name in ("mlm_logits", "nsp_logits", "sequence_output"):
    assert out16[name].dtype == jnp.float32, name
    assert bool(jnp.isfinite(out16[name]).all()), name
  np.testing.assert_allclose(out16["mlm_logits"], out32["mlm_logits"], atol=3e-2)


def test_dropout_uses_the_key(params, batch):
  b = batch
  run = lambda seed: bert.Bert(CFG).apply(  # noqa: E731
    {"params": params},
    b["ids"],
    b["segs"],
    b["mask"],
    b["positions"],
    train=True,
    rngs={"dropout": jax.random.key(seed)},
  )["nsp_logits"]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))


def test_presets_and_bad_config():
  base = bert.BertConfig.preset("base", 30522)
  assert (base.num_layers, base.hidden, base.num_heads, base.intermediate) == (12, 768, 12, 3072)
  assert bert.BertConfig.preset("smoke", 10, dropout=0.0).dropout == 0.0
  with pytest.raises(ValueError, match="preset"):
    bert.BertConfig.preset("huge", 10)
  with pytest.raises(ValueError, match="num_heads"):
    bert.BertConfig(vocab_size=10, hidden=30, num_layers=1, num_heads=4, intermediate=8)


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(mask=lambda b: b["mask"].astype(jnp.int32)), "input_mask must be bool"),
    (dict(segs=lambda b: b["segs"][:, :4]), "segment_ids"),
    (dict(positions=lambda b: None), "masked_positions"),
    (dict(positions=lambda b: b["positions"][:2]), "masked_positions"),
    (
      dict(
        ids=lambda b: jnp.zeros((B, 20), jnp.int32),
        segs=lambda b: jnp.zeros((B, 20), jnp.int32),
        mask=lambda b: jnp.ones((B, 20), bool),
      ),
      "max_position",
    ),
  ],
)
def test_bad_inputs_raise(params, batch, change, match):
  b = {**batch, **{k: f(batch) for k, f in change.items()}}
  with pytest.raises(ValueError, match=match):
    bert.Bert(CFG).apply(
      {"params": params}, b["ids"], b["segs"], b["mask"], b["positions"], train=False
    )


def test_unknown_head_mode_raises(params, batch):
  b = batch
  with pytest.raises(ValueError, match="mlm_head"):
    bert.Bert(CFG).apply(
      {"params": params},
      b["ids"],
      b["segs"],
      b["mask"],
      b["positions"],
      train=False,
      mlm_head="sampled",
    )


@pytest.mark.parametrize("mlm_head", bert.HEAD_MODES)
def test_train_flops_formula_matches_xla_forward_count(mlm_head):
  # MFU in benchmarks/bert_step_bench.py divides by this count: XLA's own FLOP count of the
  # forward pass (all ops) must be within a few percent of a third of it.
  config = bert.BertConfig(
    vocab_size=2000,
    hidden=256,
    num_layers=2,
    num_heads=4,
    intermediate=1024,
    dropout=0.0,
    attention_dropout=0.0,
  )
  model, (b, t, p) = bert.Bert(config), (4, 64, 10)
  ids, mask = jnp.ones((b, t), jnp.int32), jnp.ones((b, t), bool)
  positions = jnp.zeros((b, p), jnp.int32)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), ids, ids, mask, positions, train=False)
  )

  def forward(params):
    out = model.apply({"params": params}, ids, ids, mask, positions, train=False, mlm_head=mlm_head)
    return out["mlm_logits"].sum() + out["nsp_logits"].sum()

  cost = jax.jit(forward).lower(variables["params"]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  expected = bert.train_flops_per_sequence(config, t, p, mlm_head) * b / 3
  assert cost["flops"] == pytest.approx(expected, rel=0.05)
