"""The BERT experiment: the four MLM reductions, empty masks, smoke train/checkpoint/resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import launch
from experiments import bert_pretrain
from maskax.masking import losses
from maskax.models import bert


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = bert_pretrain.get_config("smoke")
  workdir = str(tmp_path_factory.mktemp("bert"))
  tok, train_data, eval_batches = bert_pretrain.build_data(config, workdir)
  model = bert.Bert(
    bert.BertConfig.preset("smoke", tok.vocab_size, dropout=0.0, attention_dropout=0.0)
  )
  batch = {k: jnp.asarray(v) for k, v in next(train_data).items()}
  params = model.init(
    jax.random.key(0),
    batch["input_ids"],
    batch["segment_ids"],
    batch["input_mask"],
    batch["masked_lm_positions"],
    train=False,
  )["params"]
  return config, tok, model, params, batch


def _loss(setup, reduction, batch=None):
  config, tok, model, params, default_batch = setup
  with config.unlocked():
    config.loss.mlm_reduction = reduction
  loss_fn = bert_pretrain.make_loss(model, config, tok.mask_id)
  return loss_fn(
    params, {}, default_batch if batch is None else batch, jax.random.key(1), train=False
  )


def test_reductions_share_the_numerator_or_not_as_named(setup):
  _, _, _, _, batch = setup
  terms = {m: _loss(setup, m)[0]["mlm"] for m in bert_pretrain.MLM_REDUCTIONS}
  masked_total, masked_weight = terms["masked"]
  assert masked_weight == np.sum(batch["masked_lm_weights"])
  np.testing.assert_allclose(terms["masked_sum_over_nonpad"][0], masked_total, rtol=1e-6)
  assert terms["masked_sum_over_nonpad"][1] == np.sum(batch["input_mask"])
  assert terms["all_nonpad_tokens"][1] == np.sum(batch["input_mask"])
  assert terms["all_tokens"][1] == batch["input_mask"].size
  # The reported masked-token metric is the same quantity whatever is optimised.
  metric = {m: _loss(setup, m)[1]["mlm_masked_loss"] for m in bert_pretrain.MLM_REDUCTIONS}
  for m in bert_pretrain.MLM_REDUCTIONS:
    np.testing.assert_allclose(metric[m][0], masked_total, rtol=1e-5)


def test_batch_without_any_mask_gives_zero_mlm_and_finite_grads(setup):
  config, tok, model, params, batch = setup
  empty = dict(batch, masked_lm_weights=jnp.zeros_like(batch["masked_lm_weights"]))
  terms, metrics, _ = _loss(setup, "masked", empty)
  assert terms["mlm"] == (0.0, 0.0)
  assert metrics["mlm_accuracy_mask_slots"] == (0.0, 0.0)
  loss_fn = bert_pretrain.make_loss(model, config, tok.mask_id)

  def objective(p):
    terms, _, _ = loss_fn(p, {}, empty, jax.random.key(1), train=False)
    return sum(losses.safe_div(t, w) for t, w in terms.values())

  value, grads = jax.value_and_grad(objective)(params)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Only NSP trains the MLM head's output bias when nothing is masked: its gradient is zero.
  assert np.all(grads["mlm"]["output_bias"] == 0)


def test_slot_accuracies_separate_copying_from_prediction(setup):
  # A model that copies its input token scores 1 on kept slots and 0 on [MASK] and random
  # slots: the split must show exactly that, and the three kinds partition the real slots.
  _, tok, _, _, batch = setup
  shown = jnp.take_along_axis(batch["input_ids"], batch["masked_lm_positions"], axis=1)
  copy_logits = jax.nn.one_hot(shown, tok.vocab_size)
  acc = losses.mlm_slot_accuracies(copy_logits, batch, tok.mask_id)
  real = batch["masked_lm_weights"] > 0
  np.testing.assert_allclose(
    acc["mlm_accuracy_mask_slots"][1], np.sum(real & (shown == tok.mask_id))
  )
  assert acc["mlm_accuracy_mask_slots"][1] > 0 and acc["mlm_accuracy_kept_slots"][1] > 0
  assert acc["mlm_accuracy_mask_slots"][0] == 0 and acc["mlm_accuracy_random_slots"][0] == 0
  assert acc["mlm_accuracy_kept_slots"][0] == acc["mlm_accuracy_kept_slots"][1]
  assert sum(w for _, w in acc.values()) == np.sum(batch["masked_lm_weights"])


def test_runs_on_the_same_data_share_one_tokenizer(setup, tmp_path):
  # WordPiece training is not reproducible (tokenizers#1794): a second workdir must reuse the
  # first one's vocabulary through the shared cache, or a sweep would compare different vocabs.
  config, tok, _, _, _ = setup
  other, _, _ = bert_pretrain.build_data(config, str(tmp_path))
  assert [other.id_to_token(i) for i in range(other.vocab_size)] == [
    tok.id_to_token(i) for i in range(tok.vocab_size)
  ]


def test_unknown_reduction_is_a_clear_error(setup):
  with pytest.raises(ValueError, match="loss.mlm_reduction='mean'"):
    _loss(setup, "mean")


def test_unigram_baseline_is_a_probability(setup, tmp_path):
  config, tok, _, _, _ = setup
  _, train_data, eval_batches = bert_pretrain.build_data(config, str(tmp_path))
  base = bert_pretrain.unigram_baseline(train_data, eval_batches, tok.vocab_size)
  assert 0 < base["unigram_accuracy"] < 0.5 and base["unigram_loss"] > 0


@pytest.mark.slow
def test_smoke_trains_checkpoints_and_resumes(tmp_path):
  args = ["--config=experiments/bert_pretrain.py:smoke", f"--workdir={tmp_path}"]
  proc = launch(*args, check=True)
  assert "eval/mlm_accuracy" in proc.stdout
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
  assert (tmp_path / "tokenizer.json").exists()
  # The schedule is a function of train.steps: extending the run must be asked for explicitly.
  proc = launch(*args, "--config.train.steps=6")
  assert proc.returncode == 1 and "train.steps: 4 -> 6" in proc.stderr
  proc = launch(*args, "--config.train.steps=6", "--allow_config_change", check=True)
  assert "resumed at step 4" in proc.stderr
  assert os.path.isdir(tmp_path / "checkpoints" / "6")
  # Using the trained run reads it with its saved config and writes nothing into the workdir.
  before = {p: os.path.getmtime(tmp_path / p) for p in ("config.json", "metrics.jsonl")}
  inputs = tmp_path.parent / "inputs.txt"
  inputs.write_text("the [MASK] is returned .\nopen the file . ||| read it .\n")
  proc = launch(
    "--config=experiments/bert_pretrain.py",
    f"--workdir={tmp_path}",
    f"--predict={inputs}",
    check=True,
  )
  masks, pair = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(masks["masks"]) == 1 and len(masks["masks"][0]) == 5
  assert 0 < pair["is_next_probability"] < 1
  proc = launch(
    "--config=experiments/bert_pretrain.py",
    f"--workdir={tmp_path}",
    f"--export={tmp_path.parent / 'hf'}",
    check=True,
  )
  assert (tmp_path.parent / "hf" / "model.safetensors").exists()
  assert before == {p: os.path.getmtime(tmp_path / p) for p in before}
  proc = launch(
    "--config=experiments/bert_pretrain.py", f"--workdir={tmp_path}", "--predict=/nonexistent.txt"
  )
  assert proc.returncode == 1 and "--predict=/nonexistent.txt: no such file" in proc.stderr


def test_weight_decay_spares_layer_norm_and_biases(setup):
  """With zero gradients AdamW's update is the decay alone: LayerNorm parameters and biases must
  not move, every kernel and embedding table must shrink (google-research/bert's rule)."""
  config, _, _, params, _ = setup
  with config.unlocked():
    config.train.warmup_steps = 0
    config.train.weight_decay = 0.1
  optimizer = bert_pretrain.make_optimizer(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  moved = {
    jax.tree_util.keystr(path): bool(jnp.any(u != 0))
    for path, u in jax.tree.leaves_with_path(updates)
  }
  spared = [k for k in moved if k.endswith(("['bias']", "['scale']", "['output_bias']"))]
  assert spared and not any(moved[k] for k in spared), [k for k in spared if moved[k]]
  decayed = [k for k in moved if k not in spared]
  assert any("embedding" in k for k in decayed) and any("kernel" in k for k in decayed)
  assert all(moved[k] for k in decayed), [k for k in decayed if not moved[k]]


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bert_trained"))
  config = bert_pretrain.get_config("smoke")
  bert_pretrain.run(config, workdir)
  return config, workdir


def test_predict_fills_masks_and_scores_pairs(trained_smoke):
  config, workdir = trained_smoke
  out = bert_pretrain.predict(
    config,
    workdir,
    [
      "the value of the [MASK] is returned .",
      "return the [MASK] of the [MASK] list .",
      "open the file . ||| read its lines .",
    ],
    top_k=3,
  )
  assert [len(o["masks"]) for o in out[:2]] == [1, 2]
  for slot in out[0]["masks"] + out[1]["masks"]:
    probs = [p for _, p in slot]
    assert len(slot) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert all(isinstance(t, str) and t for t, _ in slot)
  assert 0 < out[2]["is_next_probability"] < 1


def test_predict_input_errors_are_one_line(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  with pytest.raises(ValueError, match="has no \\[MASK\\] token to fill"):
    bert_pretrain.predict(config, workdir, ["no mask here"])
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    bert_pretrain.predict(config, str(tmp_path), ["a [MASK] b"])


def test_exported_run_gives_transformers_the_same_predictions(trained_smoke, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  config, workdir = trained_smoke
  out = bert_pretrain.export(config, workdir, str(tmp_path / "hf"))
  hf, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  hf.eval()
  model, params, tok = bert_pretrain._trained_model(config, workdir)
  text = "the value of the [MASK] is returned ."
  ids = [tok.cls_id] + tok.encode(text) + [tok.sep_id]
  slot = ids.index(tok.mask_id)
  ours = model.apply(
    {"params": params},
    jnp.asarray([ids]),
    jnp.zeros((1, len(ids)), jnp.int32),
    jnp.ones((1, len(ids)), bool),
    jnp.asarray([[slot]]),
    train=False,
  )
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor([ids]))
  np.testing.assert_allclose(
    theirs.prediction_logits[0, slot].numpy(), np.asarray(ours["mlm_logits"][0, 0]), atol=1e-4
  )
  np.testing.assert_allclose(
    theirs.seq_relationship_logits[0].numpy(), np.asarray(ours["nsp_logits"][0]), atol=1e-4
  )


def test_pretraining_continues_from_an_imported_checkpoint(trained_smoke, tmp_path):
  """Export a run, then start a new run from the export: its step-0 parameters are the
  exported ones, its tokenizer the export's vocab.txt, and it trains."""
  config, workdir = trained_smoke
  exported = bert_pretrain.export(config, workdir, str(tmp_path / "hf"))
  imported = bert_pretrain.get_config("smoke")
  with imported.unlocked():
    imported.model.init_from = exported
    imported.model.size = "base"  # ignored: the checkpoint's sizes win
  tok, _, _ = bert_pretrain.build_data(imported, str(tmp_path / "run"))
  model = bert_pretrain.make_model(imported, tok.vocab_size)
  start, _ = bert_pretrain.init_fn(model, imported)(jax.random.key(0))
  _, trained_params, trained_tok = bert_pretrain._trained_model(config, workdir)
  assert tok.vocab_size == trained_tok.vocab_size and model.config.hidden == 32
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(trained_params)):
    np.testing.assert_array_equal(a, b)
  final = bert_pretrain.run(imported, str(tmp_path / "run"))
  assert np.isfinite(final["loss"])
