"""Tests for maskax.models.hf_bert: transformers loads the export, maskax loads transformers'.

Uses transformers and a CPU torch from requirements-dev.txt on tiny random models built here,
so no file is downloaded or committed.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskax.data import tokenizer as tokenizer_lib
from maskax.models import bert, hf_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, B, T, P = 100, 3, 12, 3
CFG = bert.BertConfig(
  vocab_size=V, hidden=32, num_layers=2, num_heads=2, intermediate=64, max_position=16
)
WORDS = [
  "the",
  "cat",
  "sat",
  "on",
  "mat",
  "dog",
  "ran",
  "a",
  "big",
  "red",
  "##s",
  "##ing",
  "naïve",
  "über",
]
TOKENS = (
  list(tokenizer_lib.SPECIAL_TOKENS)
  + WORDS
  + [chr(c) for c in range(ord("a"), 123)]
  + [f"##{chr(c)}" for c in range(ord("a"), 123)]
)
TOKENS += [f"[unused{i}]" for i in range(V - len(TOKENS))]
TOL = 1e-4


def _batch(seed=0):
  """ids, segments, mask (lengths 12, 9, 5), P sorted masked positions inside each row."""
  rng = np.random.default_rng(seed)
  lengths = np.array([T, 9, 5])
  mask = np.arange(T)[None, :] < lengths[:, None]
  ids = np.where(mask, rng.integers(5, V, (B, T)), 0)
  segs = np.where(mask & (np.arange(T)[None, :] >= lengths[:, None] // 2), 1, 0)
  positions = np.stack([np.sort(rng.choice(n, P, replace=False)) for n in lengths])
  return ids, segs, mask, positions


@pytest.fixture(scope="module")
def params():
  """Random params with every tensor (LayerNorms and biases included) distinct and non-trivial."""
  ids, segs, mask, positions = map(jnp.asarray, _batch())
  p = bert.Bert(CFG).init(jax.random.key(0), ids, segs, mask, positions, train=False)["params"]
  leaves, treedef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(
    treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def _maskax_logits(params, config):
  ids, segs, mask, positions = map(jnp.asarray, _batch())
  out = bert.Bert(config).apply({"params": params}, ids, segs, mask, positions, train=False)
  return np.asarray(out["mlm_logits"]), np.asarray(out["nsp_logits"])


def _hf_logits(model):
  """HF logits at the masked positions (f32[B, P, V]) and NSP logits (f32[B, 2])."""
  ids, segs, mask, positions = _batch()
  with torch.no_grad():
    out = model.eval()(
      input_ids=torch.tensor(ids),
      token_type_ids=torch.tensor(segs),
      attention_mask=torch.tensor(mask.astype(np.int64)),
    )
  mlm = out.prediction_logits.numpy()
  return np.take_along_axis(mlm, positions[:, :, None], axis=1), out.seq_relationship_logits.numpy()


def _max_diffs(a, b):
  return tuple(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def test_export_loads_in_transformers_with_equal_logits(params, tmp_path):
  hf_bert.export(params, CFG, TOKENS, tmp_path)
  model, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
  assert {k: list(v) for k, v in info.items()} == {k: [] for k in info}
  assert model.config.hidden_act == "gelu_new" and model.config.layer_norm_eps == 1e-12
  # The reloaded decoder is tied to the embeddings: nothing was dropped or left random.
  assert model.cls.predictions.decoder.weight.data_ptr() == (
    model.bert.embeddings.word_embeddings.weight.data_ptr()
  )
  mlm_diff, nsp_diff = _max_diffs(_maskax_logits(params, CFG), _hf_logits(model))
  print(f"export: max |mlm diff| = {mlm_diff:.2e}, max |nsp diff| = {nsp_diff:.2e}")
  assert mlm_diff <= TOL and nsp_diff <= TOL


def test_export_writes_what_save_pretrained_writes(params, tmp_path):
  """Same tensor names and shapes as transformers' own file: no missing/unexpected weights."""
  from safetensors.numpy import load_file

  hf_bert.export(params, CFG, TOKENS, tmp_path / "ours")
  config = transformers.BertConfig(**json.loads((tmp_path / "ours/config.json").read_text()))
  transformers.BertForPreTraining(config).save_pretrained(
    tmp_path / "theirs", safe_serialization=True
  )
  ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("ours", "theirs"))
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_import_from_transformers_with_equal_logits(hidden_act, tmp_path):
  config = transformers.BertConfig(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
    hidden_act=hidden_act,
  )
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(config)
  with torch.no_grad():  # LayerNorms start at 1/0 and biases at 0: make every tensor matter
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in TOKENS), encoding="utf-8")

  params, cfg, vocab = hf_bert.load(tmp_path)
  assert cfg.gelu_approximate == (hidden_act != "gelu")
  assert (cfg.num_layers, cfg.hidden, cfg.num_heads, cfg.intermediate, cfg.max_position) == (
    2,
    32,
    2,
    64,
    16,
  )
  assert vocab == TOKENS
  mlm_diff, nsp_diff = _max_diffs(_maskax_logits(params, cfg), _hf_logits(model))
  print(f"import ({hidden_act}): max |mlm diff| = {mlm_diff:.2e}, max |nsp diff| = {nsp_diff:.2e}")
  assert mlm_diff <= TOL and nsp_diff <= TOL


def test_params_round_trip_is_bitwise(params):
  back, config = hf_bert.from_hf(*hf_bert.to_hf(params, CFG))
  assert config == CFG
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_vocab_round_trip_and_tokenizer(params, tmp_path):
  vocab_in = tmp_path / "in.txt"
  vocab_in.write_text("".join(t + "\n" for t in TOKENS), encoding="utf-8")
  out = hf_bert.export(params, CFG, vocab_in, tmp_path / "model")
  assert (out / "vocab.txt").read_text(encoding="utf-8") == vocab_in.read_text(encoding="utf-8")
  _, _, vocab = hf_bert.load(out)
  assert vocab == TOKENS
  # transformers' tokenizer of the export splits text as maskax's tokenizer of the same vocab.
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = tokenizer_lib.from_vocab_txt(out / "vocab.txt")
  text = "Naïve cats sat on über mats"
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


def test_google_research_config_reads_gelu_as_tanh(params, tmp_path):
  """bert_config.json (google-research/bert keys, no model_type): 'gelu' = their tanh GELU."""
  from safetensors.numpy import save_file

  _, state = hf_bert.to_hf(params, CFG)
  google = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=16,
    type_vocab_size=2,
    initializer_range=0.02,
  )
  (tmp_path / "bert_config.json").write_text(json.dumps(google))
  save_file(state, str(tmp_path / "model.safetensors"))
  (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in TOKENS), encoding="utf-8")
  back, config, vocab = hf_bert.load(tmp_path)
  assert config == CFG and vocab == TOKENS
  np.testing.assert_array_equal(_maskax_logits(back, config)[0], _maskax_logits(params, CFG)[0])


def _write(tmp_path, params, **edit):
  """An exported directory, then `edit`: file name -> None (delete), dict (config keys) or a
  callable on the state dict (rewrites model.safetensors)."""
  from safetensors.numpy import load_file, save_file

  hf_bert.export(params, CFG, TOKENS, tmp_path)
  for name, change in edit.items():
    path = tmp_path / name.replace("_", ".", 1)
    if change is None:
      path.unlink()
    elif isinstance(change, dict):
      path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    else:
      save_file(change(load_file(path)), str(path))
  return tmp_path


def _reshape(state):
  state["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((32, 64), np.float32)
  return state


def _untie(state):
  state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1
  return state


def _drop_nsp(state):
  del state["cls.seq_relationship.weight"]
  return state


@pytest.mark.parametrize(
  "edit, match",
  [
    (dict(config_json=None), "neither config.json nor bert_config.json"),
    (dict(model_safetensors=None), "model.safetensors does not exist; only model.safetensors"),
    (dict(vocab_txt=None), "vocab.txt is not a file"),
    (dict(config_json={"hidden_act": "relu"}), "hidden_act='relu' is not supported"),
    (dict(config_json={"num_attention_heads": 5}), "hidden=32 must be divisible"),
    (dict(config_json={"hidden_size": None}), "lacks 'hidden_size'"),
    (dict(config_json={"model_type": "roberta"}), "model_type='roberta' is not 'bert'"),
    (dict(config_json={"vocab_size": 50}), r"word_embeddings.weight has shape \(100, 32\)"),
    (dict(model_safetensors=_reshape), r"intermediate.dense.weight has shape \(32, 64\)"),
    (dict(model_safetensors=_untie), "decoder.weight differs from"),
    (dict(model_safetensors=_drop_nsp), "lacks cls.seq_relationship.weight"),
  ],
)
def test_bad_directory_is_one_clear_line(params, tmp_path, edit, match):
  directory = _write(tmp_path, params, **edit)
  with pytest.raises(ValueError, match=match) as e:
    hf_bert.load(directory)
  assert "\n" not in str(e.value)


def test_bad_inputs_to_load_and_export(params, tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    hf_bert.load(tmp_path / "nowhere")
  (tmp_path / "bert_model.ckpt.index").write_text("")
  (tmp_path / "bert_config.json").write_text("{}")
  with pytest.raises(ValueError, match="TensorFlow checkpoint"):
    hf_bert.load(tmp_path)
  with pytest.raises(ValueError, match="vocab has 101 tokens for vocab_size=100"):
    hf_bert.export(params, CFG, TOKENS + ["extra"], tmp_path / "out")
  with pytest.raises(ValueError, match="params layer_0/ffn_in/kernel has shape"):
    hf_bert.to_hf(params, bert.BertConfig(**{**CFG.__dict__, "intermediate": 48}))
  with pytest.raises(ValueError, match="params lack layer_2"):
    hf_bert.to_hf(params, bert.BertConfig(**{**CFG.__dict__, "num_layers": 3}))
