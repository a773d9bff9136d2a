"""The BERT experiment: the four MLM reductions, empty masks, the prepared-data cache, smoke
train/checkpoint/resume."""

import json
import os
from pydoc_data import topics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import launch_here
from experiments import bert_pretrain
from maskax.masking import losses
from maskax.data import bert_cache, corpus, docfile, prepare
from maskax.data import tokenizer as tk
from maskax.models import bert, bert_pretraining


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = bert_pretrain.get_config("smoke")
  workdir = str(tmp_path_factory.mktemp("bert"))
  tok, train_data, eval_batches = bert_pretrain.make_data(config, workdir)
  model = bert.Bert(
    bert.BertConfig.preset("smoke", tok.vocab_size, dropout=0.0, attention_dropout=0.0)
  )
  batch = {k: jnp.asarray(v) for k, v in next(train_data).items()}
  # Jitted: eagerly, every op of the model would compile a program of its own.
  params = jax.jit(model.init, static_argnames="train")(
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
  loss_fn = jax.jit(bert_pretrain.make_loss(model, config, tok.mask_id), static_argnames="train")
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

  value, grads = jax.jit(jax.value_and_grad(objective))(params)
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
  other, _, _ = bert_pretrain.make_data(config, str(tmp_path))
  assert [other.id_to_token(i) for i in range(other.vocab_size)] == [
    tok.id_to_token(i) for i in range(tok.vocab_size)
  ]


def test_unknown_reduction_is_a_clear_error(setup):
  with pytest.raises(ValueError, match="loss.mlm_reduction='mean'"):
    _loss(setup, "mean")


def test_unigram_baseline_is_a_probability(setup, tmp_path):
  config, tok, _, _, _ = setup
  _, train_data, eval_batches = bert_pretrain.make_data(config, str(tmp_path))
  counts = train_data.unigram_counts()
  assert counts.sum() > 0
  base = bert_pretraining.unigram_baseline(counts, tok.special_ids, eval_batches)
  assert 0 <= base["unigram_accuracy"] < 0.5 and base["unigram_loss"] > 0
  # Training text made of the held-out slots' most common token alone scores its share.
  ids = np.concatenate([b["masked_lm_ids"][b["masked_lm_weights"] > 0] for b in eval_batches])
  top = np.bincount(ids).argmax()
  only = np.zeros_like(counts)
  only[top] = 1
  acc = bert_pretraining.unigram_baseline(only, tok.special_ids, eval_batches)["unigram_accuracy"]
  assert acc == np.mean(ids == top) > 0


def _smoke_config(cache, **data):
  config = bert_pretrain.get_config("smoke")
  with config.unlocked():
    config.data.cache_dir = str(cache)
    config.data.update(data)
  return config


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
  """A user's text file in google-research/bert's layout (pydoc topics, 8 sentences a document)."""
  text = "\n".join(topics.topics[k] for k in sorted(topics.topics)[:40])
  sentences = corpus.split_sentences(text)
  docs = [sentences[i : i + 8] for i in range(0, len(sentences) - 7, 8)]
  path = tmp_path_factory.mktemp("text") / "corpus.txt"
  path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n")
  return path


def _prepared(cache):
  return sorted((cache / "bert").glob("prepared-*"))


def _counting(monkeypatch, module, name):
  """Counts the calls of `module.name` (still calling it)."""
  calls, original = [], getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
  return calls


def test_runs_sharing_a_cache_prepare_once_until_an_input_changes(
  text_corpus, tmp_path, monkeypatch
):
  prepared = _counting(monkeypatch, prepare, "prepare")
  trained = _counting(monkeypatch, tk, "train_wordpiece")
  path = tmp_path / "corpus.txt"
  path.write_text(text_corpus.read_text())
  config = _smoke_config(tmp_path / "cache", path=str(path))
  tok, _, _ = bert_pretrain.make_data(config, str(tmp_path / "a"))
  (folder,) = _prepared(tmp_path / "cache")
  stamp = (folder / docfile.MANIFEST).stat().st_mtime_ns
  other, train_data, _ = bert_pretrain.make_data(config, str(tmp_path / "b"))
  assert len(prepared) == len(trained) == 1  # The second run reused both.
  assert _prepared(tmp_path / "cache") == [folder]
  assert (folder / docfile.MANIFEST).stat().st_mtime_ns == stamp
  assert other.tokenizer.get_vocab() == tok.tokenizer.get_vocab()
  assert train_data.docs.path == folder
  # Same size, another mtime: another fingerprint, another folder.
  before = bert_cache.input_fingerprint(str(path))
  os.utime(path, ns=(stamp, path.stat().st_mtime_ns + 10**9))
  assert bert_cache.input_fingerprint(str(path)) != before
  bert_pretrain.make_data(config, str(tmp_path / "c"))
  assert len(_prepared(tmp_path / "cache")) == 2 and len(prepared) == 2


def test_a_prepared_folder_is_read_as_it_is(text_corpus, tmp_path):
  config = _smoke_config(tmp_path / "cache", path=str(text_corpus))
  tok, _, _ = bert_pretrain.make_data(config, str(tmp_path / "a"))
  (folder,) = _prepared(tmp_path / "cache")
  direct = _smoke_config(tmp_path / "other_cache", path=str(folder))
  again, _, eval_batches = bert_pretrain.make_data(direct, str(tmp_path / "b"))
  assert again.tokenizer.get_vocab() == tok.tokenizer.get_vocab() and eval_batches
  assert not (tmp_path / "other_cache").exists()
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
  with direct.unlocked():
    direct.data.vocab_file = str(vocab)
  with pytest.raises(ValueError, match="prepared with another vocabulary"):
    bert_pretrain.make_data(direct, str(tmp_path / "c"))


def test_batches_do_not_depend_on_the_process_count(text_corpus, tmp_path):
  """Held-out and training batches of 2 processes (process 1 reads what process 0 prepared)
  are the rows of the 1-process batches: a run may resume with another process count."""
  config = _smoke_config(tmp_path / "cache", path=str(text_corpus))
  _, train_one, eval_one = bert_cache.for_config(config, str(tmp_path / "a"))
  halves = [
    bert_cache.for_config(config, str(tmp_path / "a"), process_index=p, process_count=2)
    for p in (0, 1)
  ]
  assert len(eval_one) == len(halves[0][2]) == config.data.eval_batches
  pairs = [(eval_one, [h[2] for h in halves])]
  pairs.append(
    ([next(train_one) for _ in range(3)], [[next(h[1]) for _ in range(3)] for h in halves])
  )
  for one, (first, second) in pairs:
    for whole, a, b in zip(one, first, second):
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key], err_msg=key)
  assert bert_pretrain.RESUME_ANY_PROCESS_COUNT


def test_a_path_without_files_names_the_config_key(tmp_path):
  config = _smoke_config(tmp_path / "cache", path=str(tmp_path / "missing*.txt"))
  with pytest.raises(ValueError, match=r"^data.path=.*missing\*.txt.*matches no file"):
    bert_pretrain.make_data(config, str(tmp_path / "a"))


def test_other_processes_wait_for_process_0_with_a_bound(text_corpus, tmp_path):
  config = _smoke_config(tmp_path / "cache", path=str(text_corpus), prepare_wait_s=0.5)
  with pytest.raises(RuntimeError, match="process 0 writes it.*data.cache_dir"):
    bert_cache.prepared_folder(config, str(tmp_path / "a"), process_index=1)
  lock = tmp_path / "cache" / "x.lock"
  with bert_cache._locked(lock, 1.0):  # Another run holds the lock: bounded wait, then a hint.
    with pytest.raises(RuntimeError, match="data.prepare_wait_s=0.2"):
      with bert_cache._locked(lock, 0.2):
        pass


@pytest.mark.slow
def test_smoke_trains_checkpoints_and_resumes(tmp_path):
  args = ["--config=experiments/bert_pretrain.py:smoke", f"--workdir={tmp_path}"]
  proc = launch_here(*args, check=True)
  assert "eval/mlm_accuracy" in proc.stdout
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
  assert (tmp_path / "tokenizer.json").exists()
  # The schedule is a function of train.steps: extending the run must be asked for explicitly.
  proc = launch_here(*args, "--config.train.steps=6")
  assert proc.returncode == 1 and "train.steps: 4 -> 6" in proc.stderr
  proc = launch_here(*args, "--config.train.steps=6", "--allow_config_change", check=True)
  assert "resumed at step 4" in proc.stderr
  assert os.path.isdir(tmp_path / "checkpoints" / "6")
  # Using the trained run reads it with its saved config and writes nothing into the workdir.
  before = {p: os.path.getmtime(tmp_path / p) for p in ("config.json", "metrics.jsonl")}
  inputs = tmp_path.parent / "inputs.txt"
  inputs.write_text("the [MASK] is returned .\nopen the file . ||| read it .\n")
  proc = launch_here(
    "--config=experiments/bert_pretrain.py",
    f"--workdir={tmp_path}",
    f"--predict={inputs}",
    check=True,
  )
  masks, pair = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(masks["masks"]) == 1 and len(masks["masks"][0]) == 5
  assert 0 < pair["is_next_probability"] < 1
  proc = launch_here(
    "--config=experiments/bert_pretrain.py",
    f"--workdir={tmp_path}",
    f"--export={tmp_path.parent / 'hf'}",
    check=True,
  )
  assert (tmp_path.parent / "hf" / "model.safetensors").exists()
  assert before == {p: os.path.getmtime(tmp_path / p) for p in before}
  proc = launch_here(
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
  updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
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
  """A smoke run trained end to end on the embedded corpus through a cache of its own."""
  workdir = str(tmp_path_factory.mktemp("bert_trained"))
  cache = tmp_path_factory.mktemp("bert_cache")
  config = _smoke_config(cache)
  bert_pretrain.run(config, workdir)
  (folder,) = _prepared(cache)
  assert (folder / docfile.MANIFEST).exists() and list((cache / "bert").glob("embedded-*.txt"))
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
  tok, _, _ = bert_pretrain.make_data(imported, str(tmp_path / "run"))
  model = bert_pretrain.make_model(imported, tok.vocab_size)
  init = bert_pretraining.init_fn(
    model,
    seq_len=imported.data.seq_len,
    max_predictions=imported.data.max_predictions,
    init_from=imported.model.init_from,
  )
  start, _ = init(jax.random.key(0))
  _, trained_params, trained_tok = bert_pretrain._trained_model(config, workdir)
  assert tok.vocab_size == trained_tok.vocab_size and model.config.hidden == 32
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(trained_params)):
    np.testing.assert_array_equal(a, b)
  final = bert_pretrain.run(imported, str(tmp_path / "run"))
  assert np.isfinite(final["loss"])
