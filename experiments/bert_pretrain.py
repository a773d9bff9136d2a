"""BERT pretraining (MLM + NSP): is the MLM mean over masked tokens, all tokens or non-pad tokens?

Pretrains a small BERT on the embedded corpus (English text that ships with Python), or on your
own text (`--config.data.path`), with the losses of google-research/bert `run_pretraining.py`
(`maskax.models.bert_pretraining`): mlm = token mean over the real prediction slots of the whole
global batch, nsp = batch mean, total = mlm + nsp. Every corpus goes through one data path
(`maskax.data.bert_cache`): prepared once into shards in a shared cache, then streamed. The
ablation trains the same model with four MLM reductions (`loss.mlm_reduction`) and compares
held-out *masked-token* accuracy:

  python launch.py --config=experiments/bert_pretrain.py       # the main job (tiny BERT)
  python launch.py --config=experiments/bert_pretrain.py:ablation \
      --sweep=loss.mlm_reduction=masked,masked_sum_over_nonpad,all_nonpad_tokens,all_tokens
  python launch.py --config=experiments/bert_pretrain.py:ablation --sweep=model.mlm_head=gathered,full

Hardware: an idle 2-core CPU runs the default in about 3 minutes (the first run on a machine
also prepares the embedded corpus into the cache: about 10 s); `base` is for accelerators (6.5
steps/s on one H200). Expected (measured, README, docs/bert_data.md): held-out masked-token
accuracy 0.11-0.13 against 0.057 for the unigram baseline. Accuracy is also reported per kind of slot ([MASK] /
random / kept, `losses.mlm_slot_accuracies`): only [MASK] slots measure prediction from context.
"""

from __future__ import annotations

import ml_collections

from experiments import common
from maskax.data import bert_cache
from maskax.models import bert, bert_predict, bert_pretraining, hf_bert
from maskax.training import progress, restore, train

PRESETS = {
  "default": "tiny BERT (2x128), seq 128, 600 steps: about 3 minutes on a 2-core CPU",
  "ablation": "as default with 200 steps, for the 4-way MLM-reduction sweep",
  "mini": "4x256 BERT, 2,000 steps (a faster CPU or a GPU)",
  "base": "BERT-base 12x768, seq 128, batch 256, bf16 compute, WordPiece 10k (accelerators)",
  "smoke": "1-layer 32-wide BERT on a slice of the corpus, 4 steps (seconds; tests)",
}
# The learning-rate schedule decays to 0 at train.steps: extending a run would change it.
RESUME_PINNED_KEYS = ("train.steps",)
# Where and how patiently the data are prepared changes no batch.
RESUME_SAFE_KEYS = ("data.cache_dir", "data.prepare_wait_s", "data.prepare_workers")
# The global batch at each step is the same for any process count (`shards.PreparedBatches`).
RESUME_ANY_PROCESS_COUNT = True
MLM_REDUCTIONS = bert_pretraining.MLM_REDUCTIONS
REPORT_METRICS = (
  "eval/mlm_accuracy",
  "eval/mlm_accuracy_mask_slots",
  "eval/mlm_masked_loss",
  "eval/nsp_accuracy",
  "steps_per_s",
  "tokens_per_s",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = common.preset(arg, PRESETS)
  c = ml_collections.ConfigDict()
  c.seed = 0  # model init, data order, masks and dropout all derive from it
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # '' = embedded corpus; else text files (a file, folder, glob, .gz, .jsonl;
  # a sentence per line, a blank line between documents), prepared into the cache on first use,
  # or a folder `python -m maskax.data.prepare` wrote (read as it is)
  c.data.cache_dir = ""  # prepared corpora and vocabularies; '' = $MASKAX_CACHE or ~/.cache/maskax
  c.data.prepare_workers = 0  # processes that prepare a corpus (one per input file); 0 = all cores
  c.data.prepare_wait_s = 3600.0  # how long a process waits for another one's preparation
  c.data.vocab_file = ""  # '' = train WordPiece on a sample of the corpus (cached)
  c.data.vocab_size = 8000  # WordPiece vocabulary when training one
  c.data.vocab_sample_mb = 100.0  # text WordPiece trains on: the first ~N MB of the input files
  c.data.max_documents = 0  # >0: read only the corpus's first N documents (smoke tests)
  c.data.eval_fraction = 0.05  # held-out share of documents (chosen by a hash of their text)
  c.data.seed = 0  # picks the held-out documents and their masks; apart from `seed`, so that
  # runs with several training seeds score the same held-out set
  c.data.eval_batches = 8  # held-out batches per evaluation
  c.data.seq_len = 128  # max_seq_length
  c.data.max_predictions = 20  # max_predictions_per_seq (P)
  c.data.masked_lm_prob = 0.15
  c.data.masking = "static"  # static (google-research/bert) | dynamic (HF collator, per batch)
  c.data.whole_word_masking = False
  c.data.short_seq_prob = 0.1
  c.model = ml_collections.ConfigDict()
  c.model.size = "tiny"  # smoke | tiny | mini | base: shorthands for the five sizes below
  c.model.init_from = ""  # a HF BertForPreTraining folder (config.json or bert_config.json,
  # model.safetensors, vocab.txt) to continue pretraining from: its sizes and vocab.txt win
  c.model.num_layers = 0  # > 0 overrides the size's layer count (as each of the next four)
  c.model.hidden = 0  # D
  c.model.num_heads = 0
  c.model.intermediate = 0  # feed-forward width
  c.model.max_position = 0  # position table rows; 0: max(data.seq_len, 512)
  c.model.mlm_head = "gathered"  # gathered (P positions) | full (all T positions)
  c.model.dtype = "float32"  # float32 | bfloat16 (compute dtype; params stay f32)
  c.model.dropout = 0.1
  c.loss = ml_collections.ConfigDict()
  c.loss.mlm_reduction = "masked"  # one of MLM_REDUCTIONS (the ablation)
  c.train = common.train_config()  # + the loop's shared defaults (experiments/common.py)
  c.train.steps = 600
  c.train.batch_size = 32  # global
  c.train.learning_rate = 1e-3  # peak, after linear warmup; then linear decay to 0
  c.train.warmup_steps = 60
  c.train.weight_decay = 0.01  # AdamW, as BERT
  c.train.grad_clip = 1.0
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  if arg == "ablation":
    # 200 steps: the two all-position modes run the vocab projection on all B*T positions and
    # are ~4x slower per step on a CPU than the gathered head.
    c.train.steps = 200
    c.train.warmup_steps = 20
    c.train.eval_every = 50
  elif arg == "mini":
    c.model.size = "mini"
    c.train.steps = 2000
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 200
  elif arg == "base":
    c.model.size = "base"
    c.model.dtype = "bfloat16"
    # BERT's 30522 needs a larger corpus: WordPiece on the embedded one stops near 13k tokens.
    # With data.path set to your own corpus, pass --config.data.vocab_size=30522.
    c.data.vocab_size = 10000
    c.train.batch_size = 256
    c.train.steps = 10000
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 1000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
  elif arg == "smoke":
    c.model.size = "smoke"
    c.data.max_documents = 300
    c.data.vocab_size = 1000
    c.data.vocab_sample_mb = 0.5  # a fast WordPiece for tests
    c.data.seq_len = 32
    c.data.max_predictions = 5
    c.data.eval_fraction = 0.2
    c.data.eval_batches = 1
    common.smoke_loop(c.train)
    c.train.warmup_steps = 1
  return c


def make_data(config, workdir: str):
  """(tokenizer, training batches, fixed held-out batches): `bert_cache.for_config`."""
  with progress.phase("data"):
    return bert_cache.for_config(config, workdir, **common.this_process())


def make_model(config, vocab_size: int) -> bert.Bert:
  m = config.model
  sizes = ("num_layers", "hidden", "num_heads", "intermediate", "max_position")
  return bert_pretraining.make_model(
    m.size,
    vocab_size,
    seq_len=config.data.seq_len,
    init_from=m.init_from,
    dropout=m.dropout,
    dtype=m.dtype,
    **{k: m[k] for k in sizes},
  )


def make_loss(model, config, mask_id: int):
  return bert_pretraining.make_loss(
    model, mask_id=mask_id, mlm_reduction=config.loss.mlm_reduction, mlm_head=config.model.mlm_head
  )


def make_optimizer(config):
  t = config.train
  return bert_pretraining.make_optimizer(
    learning_rate=t.learning_rate,
    warmup_steps=t.warmup_steps,
    steps=t.steps,
    weight_decay=t.weight_decay,
    grad_clip=t.grad_clip,
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  tok, train_data, eval_batches = make_data(config, workdir)
  model = make_model(config, tok.vocab_size)
  baseline = bert_pretraining.unigram_baseline(
    train_data.unigram_counts(), tok.special_ids, eval_batches
  )
  d = config.data
  task = train.Task(
    init=bert_pretraining.init_fn(
      model, seq_len=d.seq_len, max_predictions=d.max_predictions, init_from=config.model.init_from
    ),
    loss=make_loss(model, config, tok.mask_id),
    optimizer=make_optimizer(config),
    train_data=train_data,
    eval_data=lambda: eval_batches,
    extra_eval=lambda state: baseline,
  )
  _, final = train.train(
    task, train.LoopOptions.from_config(config.train), workdir, seed=config.seed
  )
  final["tokens_per_s"] = common.per_second(final, config.train.batch_size * d.seq_len)
  final["params"] = float(bert.param_count(model.config))
  return final


def _trained_model(config, workdir: str):
  """(model, params, tokenizer) of the run in `workdir`, in eval mode, from its checkpoint."""
  params = restore.restore_params(workdir).params
  tok = bert_cache.run_tokenizer(workdir, config.data.vocab_file)
  return make_model(config, tok.vocab_size), params, tok


def predict(config, workdir: str, lines: list[str], *, top_k: int = 5) -> list[dict]:
  """Fill-mask for lines with [MASK]; P(second follows first) for 'first ||| second' lines."""
  model, params, tok = _trained_model(config, workdir)
  return bert_predict.predict_lines(model, params, tok, lines, top_k=top_k)


def export(config, workdir: str, out_dir: str) -> str:
  """Writes the run as a Hugging Face BertForPreTraining directory; returns its path."""
  model, params, tok = _trained_model(config, workdir)
  vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
  return str(hf_bert.export(params, model.config, vocab, out_dir))
