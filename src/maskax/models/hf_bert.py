"""BERT checkpoints in the Hugging Face format: export to and import from `BertForPreTraining`.

A directory holds `config.json`, `model.safetensors` (float32 tensors named like
`bert.encoder.layer.0.attention.self.query.weight`) and `vocab.txt` (one token per line, line
number = id). Import also reads a google-research/bert `bert_config.json` in place of
`config.json`. Shapes use B batch, T time, V vocab, D hidden, H heads, K = D / H, I intermediate.

Layouts: flax kernels are [in, out], torch `Linear` weights [out, in]; the attention projections
keep heads as separate axes here (query kernel f32[D, H, K], output kernel f32[H, K, D]) and
head-major flattened features there (f32[H*K, D] and f32[D, H*K]). The MLM decoder is tied to
the word embeddings and its bias to `cls.predictions.bias`, so neither is written: that is what
`save_pretrained` writes too, and `from_pretrained` ties them again without warnings.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maskax.models import bert

# HF `hidden_act` names of the two GELUs maskax computes. "gelu" in an HF config is the exact
# erf GELU; "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" are the tanh form (same formula).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# A buffer older transformers saved, skipped on import; tied copies, checked on import.
_IGNORED = ("bert.embeddings.position_ids",)
_TIED = {
  "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
  "cls.predictions.decoder.bias": "cls.predictions.bias",
}


def _entries(cfg: bert.BertConfig):
  """(maskax param path, HF name, layout, maskax shape) for every tensor of `Bert(cfg)`."""
  d, h, i = cfg.hidden, cfg.num_heads, cfg.intermediate
  k = d // h
  out = []
  add = lambda path, name, layout, shape: out.append((path, name, layout, shape))  # noqa: E731

  def norm(path, name):
    add(path + ("scale",), f"{name}.weight", "copy", (d,))
    add(path + ("bias",), f"{name}.bias", "copy", (d,))

  def dense(path, name, n_in, n_out):
    add(path + ("kernel",), f"{name}.weight", "dense", (n_in, n_out))
    add(path + ("bias",), f"{name}.bias", "copy", (n_out,))

  emb = "bert.embeddings"
  add(("token_embed", "embedding"), f"{emb}.word_embeddings.weight", "copy", (cfg.vocab_size, d))
  add(("position_embed",), f"{emb}.position_embeddings.weight", "copy", (cfg.max_position, d))
  add(
    ("segment_embed", "embedding"),
    f"{emb}.token_type_embeddings.weight",
    "copy",
    (cfg.type_vocab, d),
  )
  norm(("embed_norm",), f"{emb}.LayerNorm")
  for n in range(cfg.num_layers):
    path, name = (f"layer_{n}",), f"bert.encoder.layer.{n}"
    for proj in ("query", "key", "value"):
      add(
        path + ("attention", proj, "kernel"),
        f"{name}.attention.self.{proj}.weight",
        "heads_in",
        (d, h, k),
      )
      add(
        path + ("attention", proj, "bias"),
        f"{name}.attention.self.{proj}.bias",
        "heads_bias",
        (h, k),
      )
    add(
      path + ("attention", "out", "kernel"),
      f"{name}.attention.output.dense.weight",
      "heads_out",
      (h, k, d),
    )
    add(path + ("attention", "out", "bias"), f"{name}.attention.output.dense.bias", "copy", (d,))
    norm(path + ("attention_norm",), f"{name}.attention.output.LayerNorm")
    dense(path + ("ffn_in",), f"{name}.intermediate.dense", d, i)
    dense(path + ("ffn_out",), f"{name}.output.dense", i, d)
    norm(path + ("ffn_norm",), f"{name}.output.LayerNorm")
  dense(("pooler",), "bert.pooler.dense", d, d)
  dense(("nsp",), "cls.seq_relationship", d, 2)
  dense(("mlm", "transform"), "cls.predictions.transform.dense", d, d)
  norm(("mlm", "transform_norm"), "cls.predictions.transform.LayerNorm")
  add(("mlm", "output_bias"), "cls.predictions.bias", "copy", (cfg.vocab_size,))
  return out


def _hf_shape(layout, shape):
  """HF shape of a maskax tensor: [D, H, K] -> [H*K, D], [H, K] -> [H*K], [H, K, D] -> [D, H*K]."""
  return {
    "dense": shape[::-1],
    "heads_in": (math.prod(shape[1:]), shape[0]),
    "heads_bias": (math.prod(shape),),
    "heads_out": (shape[-1], math.prod(shape[:-1])),
  }.get(layout, shape)


def _to_hf_array(layout, x):
  if layout in ("dense", "heads_in", "heads_out"):
    x = x.reshape(-1, x.shape[-1]) if layout == "heads_out" else x.reshape(x.shape[0], -1)
    return np.ascontiguousarray(x.T)
  return np.ascontiguousarray(x.reshape(-1) if layout == "heads_bias" else x)


def _from_hf_array(layout, x, shape):
  return x.T.reshape(shape) if layout in ("dense", "heads_in", "heads_out") else x.reshape(shape)


def hf_config(config: bert.BertConfig) -> dict:
  """The `config.json` of `BertForPreTraining` for a maskax config (weights stay float32)."""
  return {
    "architectures": ["BertForPreTraining"],
    "model_type": "bert",
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "intermediate_size": config.intermediate,
    "hidden_act": _TANH_GELUS[0] if config.gelu_approximate else "gelu",
    "hidden_dropout_prob": config.dropout,
    "attention_probs_dropout_prob": config.attention_dropout,
    "max_position_embeddings": config.max_position,
    "type_vocab_size": config.type_vocab,
    "initializer_range": config.initializer_range,
    "layer_norm_eps": config.layer_norm_eps,
    "position_embedding_type": "absolute",
    "pad_token_id": 0,
    "tie_word_embeddings": True,
  }


def to_hf(params, config: bert.BertConfig) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, {HF name: f32 numpy array}) of `Bert(config)` params."""
  params = params["params"] if set(params) == {"params"} else params  # `Bert.init`'s variables
  flat = {
    tuple(getattr(p, "key", p) for p in path): x
    for path, x in jax.tree.flatten_with_path(params)[0]
  }
  state = {}
  for path, name, layout, shape in _entries(config):
    where = "/".join(path)
    if path not in flat:
      raise ValueError(f"params lack {where}; pass the params of Bert(config) for this config.")
    x = np.asarray(jax.device_get(flat.pop(path)), np.float32)
    if x.shape != shape:
      raise ValueError(
        f"params {where} has shape {x.shape}, config implies {shape}; pass the "
        "BertConfig these params were trained with."
      )
    state[name] = _to_hf_array(layout, x)
  if flat:
    extra = ", ".join("/".join(p) for p in sorted(flat)[:3])
    raise ValueError(
      f"params hold tensors Bert(config) does not have ({extra}); pass the params "
      "of maskax.models.bert.Bert only."
    )
  return hf_config(config), state


def _config_from(cfg: dict, source: str) -> bert.BertConfig:
  """BertConfig of a transformers config.json or a google-research/bert bert_config.json.

  The two differ in what "gelu" means: google-research/bert configs (no model_type) use it for
  their tanh-approximate `modeling.gelu`; transformers reads it as the exact erf GELU.
  """

  def get(key, default=None, integer=True):
    value = cfg.get(key, default)
    if value is None:
      raise ValueError(f"{source} lacks {key!r}; add it (every BERT config sets it).")
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < (1 if integer else 0):
      kind = "positive integer" if integer else "non-negative number"
      raise ValueError(f"{source}: {key}={value!r} must be a {kind}; fix the config.")
    return value

  if cfg.get("model_type", "bert") != "bert":
    raise ValueError(
      f"{source}: model_type={cfg['model_type']!r} is not 'bert'; only BERT "
      "checkpoints can be imported."
    )
  if cfg.get("position_embedding_type", "absolute") != "absolute" or cfg.get("is_decoder"):
    raise ValueError(
      f"{source} describes a relative-position or decoder BERT; only the "
      "absolute-position encoder is supported."
    )
  act = cfg.get("hidden_act", "gelu")
  if act not in ("gelu",) + _TANH_GELUS:
    raise ValueError(
      f"{source}: hidden_act={act!r} is not supported; maskax computes 'gelu' "
      f"(exact) and the tanh GELU {_TANH_GELUS}."
    )
  sizes = dict(
    vocab_size=get("vocab_size"),
    hidden=get("hidden_size"),
    num_layers=get("num_hidden_layers"),
    num_heads=get("num_attention_heads"),
    intermediate=get("intermediate_size"),
    max_position=get("max_position_embeddings", 512),
    type_vocab=get("type_vocab_size", 2),
    dropout=get("hidden_dropout_prob", 0.1, False),
    attention_dropout=get("attention_probs_dropout_prob", 0.1, False),
    initializer_range=get("initializer_range", 0.02, False),
    layer_norm_eps=get("layer_norm_eps", 1e-12, False),
    gelu_approximate="model_type" not in cfg or act != "gelu",
  )
  try:
    return bert.BertConfig(**sizes)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def from_hf(
  hf_config_dict: dict,
  state_dict: dict,
  *,
  config_name: str = "config.json",
  weights_name: str = "model.safetensors",
) -> tuple[dict, bert.BertConfig]:
  """(params of `Bert(config)` as f32 jax arrays, config) from a config.json (or
  bert_config.json) dict and {HF name: numpy array}; `config_name` and `weights_name` only name
  the sources in error messages."""
  config = _config_from(hf_config_dict, config_name)
  # Old checkpoints name LayerNorm parameters gamma/beta and may keep only the decoder bias.
  state = {
    n.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): x
    for n, x in state_dict.items()
  }
  if "cls.predictions.bias" not in state and "cls.predictions.decoder.bias" in state:
    state["cls.predictions.bias"] = state["cls.predictions.decoder.bias"]
  for name, source in _TIED.items():
    if name in state:
      tied = state.pop(name)
      if source in state and not np.array_equal(tied, state[source]):
        raise ValueError(
          f"{weights_name}: {name} differs from {source}; maskax ties them, so "
          "an untied checkpoint cannot be imported."
        )
  params = {}
  for path, name, layout, shape in _entries(config):
    if name not in state:
      raise ValueError(
        f"{weights_name} lacks {name}; import needs a BertForPreTraining "
        "checkpoint (BertModel and task models lack the pretraining heads)."
      )
    x = np.asarray(state.pop(name))
    want = _hf_shape(layout, shape)
    if x.shape != want:
      raise ValueError(
        f"{weights_name}: {name} has shape {x.shape}, {config_name} implies "
        f"{want}; the weights and the config do not belong together."
      )
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(_from_hf_array(layout, x.astype(np.float32), shape))
  extra = sorted(set(state) - set(_IGNORED))
  if extra:
    raise ValueError(
      f"{weights_name} holds tensors BertForPreTraining does not have "
      f"({', '.join(extra[:3])}); export it from BertForPreTraining."
    )
  return params, config


def read_vocab(path) -> list[str]:
  """Tokens of a BERT vocab.txt, line number = id (only '\\n' separates, like transformers)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{path} is not a file; pass a BERT vocab.txt (one token per line).")
  tokens = path.read_text(encoding="utf-8").split("\n")
  if tokens and tokens[-1] == "":
    tokens.pop()
  if not tokens:
    raise ValueError(f"{path} holds no tokens; pass a BERT vocab.txt (one token per line).")
  return tokens


def export(
  params,
  config: bert.BertConfig,
  vocab: str | os.PathLike | Sequence[str],
  out_dir: str | os.PathLike,
  *,
  lowercase: bool = True,
) -> pathlib.Path:
  """Writes a `BertForPreTraining` directory: config.json, model.safetensors, vocab.txt.

  vocab: a vocab.txt path or the tokens in id order (at most `config.vocab_size`). A
  tokenizer_config.json lets `AutoTokenizer` rebuild the WordPiece tokenizer; `lowercase` must
  match the tokenizer the model was trained with. Returns the directory.
  """
  from safetensors.numpy import save_file  # only export and load need it

  tokens = read_vocab(vocab) if isinstance(vocab, (str, os.PathLike)) else [str(t) for t in vocab]
  if not tokens or len(tokens) > config.vocab_size:
    raise ValueError(
      f"vocab has {len(tokens)} tokens for vocab_size={config.vocab_size}; pass "
      "the vocabulary the model was trained with."
    )
  if any("\n" in t for t in tokens):
    raise ValueError("a vocab token contains a newline; vocab.txt holds one token per line.")
  hf_cfg, state = to_hf(params, config)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
  # "format": "pt" is the metadata transformers expects in files it reads as torch weights.
  save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
  tok_cfg = {
    "tokenizer_class": "BertTokenizer",
    "do_lower_case": lowercase,
    "model_max_length": config.max_position,
  }
  (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
  return out


def _config_json(d: pathlib.Path) -> tuple[dict, pathlib.Path]:
  """(the parsed config, its path): config.json (transformers) or bert_config.json."""
  config_path = next(
    (d / n for n in ("config.json", "bert_config.json") if (d / n).is_file()), None
  )
  if config_path is None:
    raise ValueError(f"{d} has neither config.json nor bert_config.json; add the model's config.")
  try:
    cfg = json.loads(config_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{config_path} is not valid JSON ({e}); fix or re-export it.") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{config_path} is not a JSON object; pass a BERT config.")
  return cfg, config_path


def read_config(directory: str | os.PathLike) -> bert.BertConfig:
  """The `BertConfig` of a `BertForPreTraining` directory, without reading its weights."""
  cfg, config_path = _config_json(pathlib.Path(directory))
  return _config_from(cfg, str(config_path))


def load(directory: str | os.PathLike) -> tuple[dict, bert.BertConfig, list[str]]:
  """(params, config, vocab tokens) of a `BertForPreTraining` directory.

  The directory holds config.json (transformers) or bert_config.json (google-research/bert),
  model.safetensors and vocab.txt.
  """
  from safetensors.numpy import load_file

  d = pathlib.Path(directory)
  if not d.is_dir():
    raise ValueError(
      f"{d} is not a directory; pass a folder with config.json, model.safetensors and vocab.txt."
    )
  cfg, config_path = _config_json(d)
  weights = d / "model.safetensors"
  if not weights.is_file():
    hint = (
      "only model.safetensors is read: resave with save_pretrained(dir, safe_serialization=True)"
    )
    if any(d.glob("*.ckpt.index")):
      hint = "this is a TensorFlow checkpoint: convert it to model.safetensors with transformers"
    raise ValueError(f"{weights} does not exist; {hint}.")
  try:
    state = load_file(str(weights))
  except Exception as e:  # safetensors raises its own error types for corrupt files
    why = (str(e).splitlines() or [""])[0]
    raise ValueError(
      f"{weights} cannot be read ({type(e).__name__}: {why}); re-export it in float32."
    ) from None
  params, config = from_hf(cfg, state, config_name=str(config_path), weights_name=str(weights))
  tokens = read_vocab(d / "vocab.txt")
  if len(tokens) > config.vocab_size:
    raise ValueError(
      f"{d / 'vocab.txt'} has {len(tokens)} tokens but vocab_size="
      f"{config.vocab_size} in {config_path}; they must belong together."
    )
  return params, config, tokens
