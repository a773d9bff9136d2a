"""maskax.models.seq2seq and experiments/seq2seq.py: documented shapes, padding invariance,
teacher forcing equals step-by-step decoding, sampled = full softmax with every class, smoke."""

import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import launch_here, resume_to_six
from experiments import seq2seq as exp
from maskax.masking import losses
from maskax.rnn import decoding
from maskax.data import translation
from maskax.models import seq2seq

VS, VT, E, H, LAYERS = 11, 7, 5, 6, 2
SOURCE = np.array([[4, 5, 6, 7, 8], [5, 4, 9, 0, 0], [8, 0, 0, 0, 0], [6, 10, 0, 0, 0]], np.int32)
SOURCE_LEN = np.array([5, 3, 1, 2], np.int32)
TARGET_IN = np.array([[1, 4, 5, 6], [1, 6, 0, 0], [1, 0, 0, 0], [1, 5, 5, 0]], np.int32)
TARGET_OUT = np.array([[4, 5, 6, 2], [6, 2, 0, 0], [2, 0, 0, 0], [5, 5, 2, 0]], np.int32)
TARGET_LEN = np.array([4, 2, 1, 3], np.int32)
BATCH = dict(
  source=SOURCE,
  source_len=SOURCE_LEN,
  target_in=TARGET_IN,
  target_out=TARGET_OUT,
  target_len=TARGET_LEN,
)
VARIANTS = [("gru", False, "none"), ("lstm", True, "luong"), ("gru", True, "bahdanau")]


def _config(cell, bidirectional, attention, **kw):
  return seq2seq.Seq2SeqConfig(
    source_vocab=VS,
    target_vocab=VT,
    embed=E,
    hidden=H,
    layers=LAYERS,
    cell=cell,
    bidirectional=bidirectional,
    attention=attention,
    **kw,
  )


@pytest.fixture(scope="module")
def models():
  out = {}
  for variant in VARIANTS:
    config = _config(*variant)
    # XLA:CPU compiles threefry draws slowly; rbg keys keep the setup quick.
    out[variant] = (
      config,
      jax.jit(seq2seq.init_params, static_argnums=1)(jax.random.key(0, impl="rbg"), config),
    )
  return out


@pytest.mark.parametrize(
  "cell,bidirectional,attention",
  [
    ("gru", False, "none"),
    ("lstm", False, "none"),
    ("gru", True, "luong"),
    ("lstm", True, "bahdanau"),
    ("gru", False, "bahdanau"),
  ],
)
def test_every_parameter_has_the_documented_shape(cell, bidirectional, attention):
  config = _config(cell, bidirectional, attention)
  abstract = jax.eval_shape(lambda k: seq2seq.init_params(k, config), jax.random.key(0))
  shapes = jax.tree.map(lambda x: x.shape, abstract)
  G = 3 if cell == "gru" else 4
  M = 2 * H if bidirectional else H

  def layer(inputs):  # w_i on w_h is the fused [F + H, G*H] kernel: H never depends on F
    return {"w_i": (inputs, G * H), "b_i": (G * H,), "w_h": (H, G * H), "b_h": (G * H,)}

  want = {
    "source_embedding": (VS, E),
    "target_embedding": (VT, E),
    "output_w": (VT, H),
    "output_b": (VT,),
    "encoder": {},
    "decoder": {},
  }
  for l in range(LAYERS):
    enc = layer(E if l == 0 else M)
    want["encoder"][f"layer_{l}"] = {"fwd": enc, "bwd": enc} if bidirectional else enc
    extra = M if attention == "bahdanau" and l == 0 else 0
    want["decoder"][f"layer_{l}"] = layer((E if l == 0 else H) + extra)
  if attention == "luong":
    want["attention"] = {"w": (H, M)}
  if attention == "bahdanau":
    want["attention"] = {"w_query": (H, H), "w_memory": (M, H), "v": (H,)}
  if attention != "none":
    want["attention"].update({"combine_w": (M + H, H), "combine_b": (H,)})
  assert shapes == want
  is_shape = lambda s: isinstance(s, tuple)
  assert seq2seq.param_count(abstract) == sum(
    int(np.prod(s)) for s in jax.tree.leaves(want, is_leaf=is_shape)
  )


def _garbage_padded(extra_source, extra_target):
  """BATCH with wider padding holding garbage ids (out of range too) everywhere past lengths."""
  rng = np.random.default_rng(3)

  def widen(x, lengths, extra):
    wide = rng.integers(-5, 50, size=(x.shape[0], x.shape[1] + extra)).astype(np.int32)
    keep = np.arange(wide.shape[1])[None] < lengths[:, None]
    wide[:, : x.shape[1]] = np.where(keep[:, : x.shape[1]], x, wide[:, : x.shape[1]])
    return wide

  return dict(
    source=widen(SOURCE, SOURCE_LEN, extra_source),
    source_len=SOURCE_LEN,
    target_in=widen(TARGET_IN, TARGET_LEN, extra_target),
    target_out=widen(TARGET_OUT, TARGET_LEN, extra_target),
    target_len=TARGET_LEN,
  )


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_final_carry_ignores_padding(models, variant):
  config, params = models[variant]
  encode = jax.jit(seq2seq.encode, static_argnums=1)
  memory, state = encode(params, config, SOURCE, SOURCE_LEN)
  wide = _garbage_padded(4, 0)
  memory_w, state_w = encode(params, config, wide["source"], SOURCE_LEN)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(memory_w["values"][:, :5], memory["values"], rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(memory_w["values"])[~np.asarray(memory_w["mask"])])
  # A row alone at its own exact length: the same final carry as in the padded batch.
  row, n = 1, SOURCE_LEN[1]
  _, alone = encode(params, config, SOURCE[row : row + 1, :n], SOURCE_LEN[row : row + 1])
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(state)):
    np.testing.assert_allclose(a[0], b[row], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_decoder_loss_and_grads_ignore_padding(models, variant):
  config, params = models[variant]

  def objective(p, batch):
    out = seq2seq.sequence_loss(p, config, batch)
    return losses.safe_div(*out["xent"]), out

  grad = jax.jit(jax.value_and_grad(objective, has_aux=True))
  (loss, out), g = grad(params, {**BATCH, "valid": np.ones(4, bool)})
  # Wider padding full of garbage ids, plus a row marked invalid (an eval batch's filler row).
  wide = _garbage_padded(3, 2)
  wide = {k: np.concatenate([v, v[::-1][:1]]) for k, v in wide.items()}
  wide["valid"] = np.array([True] * 4 + [False])
  (loss_w, out_w), g_w = grad(params, wide)
  assert float(out["xent"][1]) == TARGET_LEN.sum()  # real target tokens, EOS included
  np.testing.assert_allclose(loss_w, loss, rtol=1e-5)
  np.testing.assert_allclose(out_w["xent"], out["xent"], rtol=1e-5)
  np.testing.assert_allclose(out_w["token_accuracy"], out["token_accuracy"])
  for a, b in zip(jax.tree.leaves(g_w), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_forcing_equals_step_by_step_decoding(models, variant):
  config, params = models[variant]

  @jax.jit
  def both(params):
    forced = seq2seq.teacher_forced(params, config, SOURCE, SOURCE_LEN, TARGET_IN, TARGET_LEN)
    memory, state = seq2seq.encode(params, config, SOURCE, SOURCE_LEN)
    steps = []
    for t in range(TARGET_IN.shape[1]):
      out, state = seq2seq.decode_step(params, config, memory, state, jnp.asarray(TARGET_IN[:, t]))
      steps.append(out)
    return forced, jnp.stack(steps, axis=1)

  forced, stepped = both(params)
  valid = np.arange(TARGET_IN.shape[1])[None] < TARGET_LEN[:, None]
  np.testing.assert_allclose(
    np.asarray(forced)[valid], np.asarray(stepped)[valid], rtol=1e-5, atol=1e-6
  )
  assert not np.any(np.asarray(forced)[~valid])


def test_sampled_softmax_with_every_class_is_the_full_softmax(models):
  config, params = models[VARIANTS[0]]
  # Every class a candidate with expected count 1 (log Q = 0): the true class is removed as an
  # accidental hit and re-enters as the true logit, which leaves exactly the full softmax.
  every = types.SimpleNamespace(ids=jnp.arange(VT), log_q=lambda k: jnp.zeros(jnp.shape(k)))

  @jax.jit
  def both(params):
    full = seq2seq.sequence_loss(params, config, BATCH)["xent"]
    sampled = seq2seq.sequence_loss(params, config, BATCH, softmax="sampled", candidates=every)
    return full, sampled["xent"]

  full, sampled = both(params)
  np.testing.assert_allclose(sampled, full, rtol=1e-5)
  with pytest.raises(ValueError, match="token_mean"):
    seq2seq.sequence_loss(
      params, config, BATCH, softmax="sampled", candidates=every, mode="sequence_mean"
    )


def test_sequence_mean_is_the_mean_of_per_sentence_means(models):
  config, params = models[VARIANTS[0]]

  @jax.jit
  def run(params):
    feats = seq2seq.teacher_forced(params, config, SOURCE, SOURCE_LEN, TARGET_IN, TARGET_LEN)
    return (
      jax.nn.log_softmax(seq2seq.logits(params, feats)),
      seq2seq.sequence_loss(params, config, BATCH, mode="sequence_mean")["xent"],
      seq2seq.sequence_loss(params, config, BATCH)["xent"],
    )

  logp, sequence_mean, token_mean = run(params)
  nll = -np.take_along_axis(np.asarray(logp, np.float64), TARGET_OUT[..., None], axis=-1)[..., 0]
  per_row = [nll[b, : TARGET_LEN[b]].mean() for b in range(4)]
  total, weight = sequence_mean
  np.testing.assert_allclose(float(total) / float(weight), np.mean(per_row), rtol=1e-5)
  total, weight = token_mean
  tokens = np.concatenate([nll[b, : TARGET_LEN[b]] for b in range(4)])
  np.testing.assert_allclose(float(total) / float(weight), tokens.mean(), rtol=1e-5)


def test_bad_config_raises():
  with pytest.raises(ValueError, match="attention"):
    _config("gru", False, "dot")
  with pytest.raises(ValueError, match="cell"):
    _config("rnn", False, "none")
  with pytest.raises(ValueError, match="hidden"):
    seq2seq.Seq2SeqConfig(source_vocab=5, target_vocab=5, hidden=0)


@pytest.mark.slow
def test_smoke_trains_checkpoints_resumes_decodes(tmp_path):
  work = str(tmp_path / "w")
  args = ("--config=experiments/seq2seq.py:smoke", f"--workdir={work}")
  first = launch_here(*args, check=True)
  log = first.stdout + first.stderr[-3000:]
  assert os.path.isdir(os.path.join(work, "checkpoints", "4")), log
  assert "eval/exact_match_beam" in first.stdout and "translate" in first.stderr, log
  assert "2 compiled shapes" in first.stderr, log
  records = resume_to_six(args, work, "--config.decode.beam_width=1")
  final = [r for r in records if "eval/exact_match" in r][-1]
  assert final["step"] == 6 and 0.0 <= final["eval/exact_match"] <= 1.0


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
  """The smoke preset trained for 600 steps at learning rate 1e-2: its 4 steps cannot learn to
  translate, and on CPU 600 tiny steps cost about what compiling costs (~13 s in all)."""
  workdir = str(tmp_path_factory.mktemp("seq2seq_trained"))
  config = exp.get_config("smoke")
  config.train.steps = config.train.checkpoint_every = config.train.log_every = 600
  config.train.learning_rate = 1e-2
  exp.run(config, workdir)
  return config, workdir


def _training_lines(config, n=12):
  """The first n training pairs as (source line, target line), read back from the run's data."""
  data = exp.make_data(config)
  sources = ["  ".join(data.source_vocab.decode(s)) for s in data.train["source"][:n]]
  return sources, [" ".join(data.target_vocab.decode(t)) for t in data.train["target_out"][:n]]


@pytest.mark.parametrize("beam_width", [1, 2])
def test_predict_decodes_training_pairs(trained_smoke, beam_width):
  config, workdir = trained_smoke
  config = config.copy_and_resolve_references()
  config.decode.beam_width = beam_width
  sources, targets = _training_lines(config)  # 1 to 5 words, every style
  out = exp.predict(config, workdir, sources)
  assert [o["source"] for o in out] == sources
  assert [o["prediction"] for o in out] == targets


def test_vocabularies_are_saved_with_the_run(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  saved = translation.load_vocabularies(os.path.join(workdir, exp.VOCAB_FILE))
  data = exp.make_data(config)
  assert saved == (data.source_vocab, data.target_vocab)
  # A run from before vocab.json rebuilds them from the data, the same way.
  shutil.copytree(workdir, tmp_path / "old")
  os.remove(tmp_path / "old" / exp.VOCAB_FILE)
  sources = _training_lines(config)[0]
  assert exp.predict(config, str(tmp_path / "old"), sources) == exp.predict(
    config, workdir, sources
  )


def test_decoder_factory_and_scores(models):
  config, params = models[VARIANTS[2]]
  decode = seq2seq.make_decoder(config, max_len=5, beam_width=2)
  direct = seq2seq.translate(params, config, SOURCE, SOURCE_LEN, max_len=5, beam_width=2)
  np.testing.assert_array_equal(decode(params, SOURCE, SOURCE_LEN).tokens, direct.tokens)
  with pytest.raises(ValueError, match="decode.beam_width=0"):
    seq2seq.make_decoder(config, max_len=5, beam_width=0)
  # Scores of a stand-in decoder that answers the references except in row 0; row 3 is filler.
  vocab = translation.Vocabulary(tuple(f"w{i}" for i in range(VT)), VT)
  batch = {**BATCH, "valid": np.array([True, True, True, False])}

  def answer(params, source, source_len):
    tokens = np.where(np.arange(4)[:, None] == 0, 3, TARGET_OUT)  # row 0 wrong
    return types.SimpleNamespace(tokens=tokens)

  scores, hyps = seq2seq.decode_scores(answer, params, [batch], vocab, long_threshold=2)
  assert hyps == [["w3"] * 4, vocab.decode(TARGET_OUT[1]), vocab.decode(TARGET_OUT[2])]
  assert scores["exact_match"] == pytest.approx(2 / 3)
  # Sources longer than 2: rows 0 and 1 (lengths 5, 3); row 2 (length 1) is short.
  assert scores["exact_len_long"] == 0.5 and scores["exact_len_short"] == 1.0
  refs = [vocab.decode(TARGET_OUT[r]) for r in range(3)]
  assert scores["bleu"] == decoding.corpus_bleu(hyps, refs)


def test_loss_rejects_too_many_sampled_candidates():
  config = _config("gru", False, "none")
  with pytest.raises(ValueError, match="loss.num_sampled=7"):
    seq2seq.make_loss(config, softmax="sampled", mode="token_mean", num_sampled=VT)


def test_predict_input_errors_are_one_line(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  with pytest.raises(ValueError, match=r"outside the source vocabulary: \['quadrillion', 'zwei'\]"):
    exp.predict(config, workdir, ["four quadrillion", "zwei"])
  config = config.copy_and_resolve_references()
  config.decode.beam_width = 0
  with pytest.raises(ValueError, match="decode.beam_width=0"):
    exp.predict(config, workdir, ["four"])
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    exp.predict(config, str(tmp_path), ["four"])
