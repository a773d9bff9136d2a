"""BERT pretraining step throughput and MFU: the experiment's real train step on random batches.

Times `maskax.training.train_step.make_train_step` (forward, backward, clipping, AdamW, the non-finite
guard) on the BERT task of `maskax.models.bert_pretraining` (what experiments/bert_pretrain.py
trains), for each (compute dtype, MLM head)
row, with random token ids and a padded input mask (lengths uniform in [T/2, T]) so no
tokenizer or corpus is needed. Per row: median step time over `--windows` windows of
`--steps` steps each (after compile and one warm-up step), tokens/s (padded B*T), the matmul
"model FLOPs" of `bert.train_flops_per_sequence`, MFU against the peak given by
`--peak_tflops` (a datasheet number) and against a large matmul measured in the same run, and
the temporary memory of the compiled step (XLA's memory analysis). Ratios between rows come
from one run.

    python benchmarks/bert_step_bench.py --quick                 # seconds on a CPU (smoke size)
    python benchmarks/bert_step_bench.py --peak_tflops=989       # BERT-base, B=256, T=128 (GPU)
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskax.data import tokenizer as tokenizer_lib
from maskax.models import bert, bert_pretraining
from maskax.training import sharding, train, train_step

MASK_ID = tokenizer_lib.SPECIAL_TOKENS.index(tokenizer_lib.MASK)  # as in tokenizers trained here
# experiments/bert_pretrain.py's `base` preset: P, and the schedule (the step does not depend on
# the learning rate's value, only on the optimizer's form).
MAX_PREDICTIONS, SCHEDULE = 20, dict(learning_rate=1e-4, warmup_steps=1000, steps=10000)


def random_batch(batch, seq_len, preds, vocab, seed=0):
  """A BertBatches-shaped batch: lengths in [T/2, T], P sorted slots inside each length."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(seq_len // 2, seq_len + 1, batch)
  mask = np.arange(seq_len)[None] < lengths[:, None]
  ids = np.where(mask, rng.integers(5, vocab, (batch, seq_len)), 0)
  positions = np.sort(np.stack([rng.choice(n, preds, replace=False) for n in lengths]), axis=1)
  return {
    "input_ids": ids,
    "original_ids": ids,
    "input_mask": mask,
    "segment_ids": (np.arange(seq_len)[None] >= lengths[:, None] // 2) & mask,
    "masked_lm_positions": positions,
    "masked_lm_ids": np.take_along_axis(ids, positions, 1),
    "masked_lm_weights": np.ones((batch, preds), np.float32),
    "next_sentence_labels": rng.integers(0, 2, batch),
  }


def matmul_tflops(dtype, size, repeats=10):
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times) / 1e12


def bench_row(args, batch_np, dtype, head, preds):
  model = make_model(args, dtype)
  task = train.Task(
    init=bert_pretraining.init_fn(model, seq_len=args.seq_len, max_predictions=preds),
    loss=bert_pretraining.make_loss(model, mask_id=MASK_ID, mlm_head=head),
    optimizer=bert_pretraining.make_optimizer(**SCHEDULE),
    train_data=None,
  )
  mesh = sharding.make_mesh()
  init = jax.jit(functools.partial(train.init_state, task), out_shardings=sharding.replicated(mesh))
  state = init(jax.random.key(0))
  step = train_step.make_train_step(task, train.LoopOptions(steps=SCHEDULE["steps"]), mesh)
  batch = sharding.shard_batch(batch_np, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  # Temporaries of the whole step (activations kept for backward, logits, workspaces): what the
  # MLM head and the compute dtype change. Arguments (state, batch) are the same for every row.
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  state, out = step(state, batch)
  jax.block_until_ready(out)
  state, out = step(state, batch)  # warm-up
  jax.block_until_ready(out)
  times = []
  for _ in range(args.windows):
    start = time.perf_counter()
    for _ in range(args.steps):
      state, out = step(state, batch)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / args.steps)
  loss = float(out["sums"]["loss"][0])
  return statistics.median(times), compile_s, loss, temp_bytes


def make_model(args, dtype):
  return bert_pretraining.make_model(
    args.size, args.vocab, seq_len=args.seq_len, dropout=args.dropout, dtype=dtype
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke model, B=8, T=32: seconds")
  parser.add_argument("--size", default="base", choices=["smoke", "tiny", "mini", "base"])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=30522)
  parser.add_argument(
    "--rows",
    default="bfloat16:gathered,float32:gathered,bfloat16:full",
    help="comma-separated dtype:head rows",
  )
  parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
  parser.add_argument("--prng_impl", default="", help="jax_default_prng_impl, e.g. rbg")
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="datasheet dense peak for MFU (e.g. 989 for H100/H200 SXM bf16)",
  )
  args = parser.parse_args()
  if args.quick:
    args.size, args.batch, args.seq_len, args.vocab, args.steps = "smoke", 8, 32, 1000, 3
  if args.prng_impl:
    jax.config.update("jax_default_prng_impl", args.prng_impl)
  preds = min(MAX_PREDICTIONS, args.seq_len // 2)  # Slots lie inside each length (>= T/2).
  batch = random_batch(args.batch, args.seq_len, preds, args.vocab)
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  peak_dtype = jnp.bfloat16 if on_gpu else jnp.float32
  measured = matmul_tflops(peak_dtype, 8192 if on_gpu else 1024)
  print(
    f"device: {device.device_kind} x{jax.device_count()}, jax {jax.__version__}; "
    f"BERT-{args.size} B={args.batch} T={args.seq_len} P={preds} V={args.vocab}, "
    f"dropout {args.dropout}, PRNG {jax.config.jax_default_prng_impl}"
  )
  print(
    f"measured {jnp.dtype(peak_dtype).name} matmul peak: {measured:.1f} TFLOP/s"
    + (f"; datasheet peak {args.peak_tflops:.0f} TFLOP/s" if args.peak_tflops else "")
  )
  print(
    "\n| dtype | MLM head | ms/step | tokens/s | model TFLOP/s | MFU (measured peak) "
    "| MFU (datasheet) | XLA temp memory | compile s | loss |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  model_config = make_model(args, "float32").config  # sizes: the same in every row
  for row in args.rows.split(","):
    dtype, head = row.split(":")
    flops = bert.train_flops_per_sequence(model_config, args.seq_len, preds, head) * args.batch
    sec, compile_s, loss, temp_bytes = bench_row(args, batch, dtype, head, preds)
    tflops = flops / sec / 1e12
    datasheet = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "-"
    print(
      f"| {dtype} | {head} | {1e3 * sec:.1f} | {args.batch * args.seq_len / sec:,.0f} "
      f"| {tflops:.3g} | {100 * tflops / measured:.1f}% | {datasheet} | {temp_bytes / 2**20:,.0f} MiB "
      f"| {compile_s:.1f} | {loss:.3f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
