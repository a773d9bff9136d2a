"""Benchmark: the BERT MLM head + loss on gathered masked positions vs on all positions.

Ours: gather the P masked rows of the encoder output first (google-research/bert
`gather_indexes`), then run the transform and the tied vocab projection on B*P rows. Peer: run
the head on all B*L rows and weight the loss to the masked ones (what a head without the gather
does, e.g. HF `BertForMaskedLM` with label -100 at unmasked tokens). Both compute the same loss;
each step is forward + backward wrt the head's parameters (tied embedding included) and the
encoder output, which is given as an array so only the head is timed.

Time: median wall time per step over repeats, after compile and one warm-up, with
`block_until_ready`. Memory: XLA's compiled `memory_analysis()` of the jitted step,
temp + output bytes (arguments are the same for both and left out); on CPU "temp" is the
buffer-assignment size of all temporaries, an upper bound on their peak live size.

    /work/venv/bin/python benchmarks/mlm_head_bench.py            # B=32, L=128, P=20, D=256,768
    /work/venv/bin/python benchmarks/mlm_head_bench.py --quick    # seconds: B=4, D=256
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskax.models import bert


def make_inputs(batch, seq_len, preds, vocab, hidden, seed=0):
  """Encoder output f32[B, L, D], positions i32[B, P] (distinct, sorted), labels i32[B, P]."""
  rng = np.random.default_rng(seed)
  seq = rng.standard_normal((batch, seq_len, hidden), np.float32)
  positions = np.sort(
    np.stack([rng.choice(seq_len, preds, replace=False) for _ in range(batch)]), axis=1
  )
  labels = rng.integers(0, vocab, (batch, preds))
  return jnp.asarray(seq), jnp.asarray(positions, jnp.int32), jnp.asarray(labels, jnp.int32)


def _weighted_mean_xent(logits, labels, weights):
  """logits f32[..., V], labels i32[...], weights f32[...] -> weighted mean cross-entropy."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(jnp.where(weights > 0, ce, 0.0) * weights) / jnp.sum(weights)


def gathered_step(head, params, seq, positions, labels):
  """Loss and grads with the head on the gathered rows only: f32[B, P, D] -> f32[B, P, V]."""

  def loss_fn(params, seq):
    h = bert.gather_positions(seq, positions)
    logits = head.apply({"params": params["head"]}, h, params["embedding"])
    return _weighted_mean_xent(logits, labels, jnp.ones(labels.shape, jnp.float32))

  return jax.value_and_grad(loss_fn, argnums=(0, 1))(params, seq)


def full_step(head, params, seq, positions, labels):
  """Loss and grads with the head on all rows, f32[B, L, V], weighted to the masked ones."""
  rows = jnp.arange(seq.shape[0])[:, None]
  dense_labels = jnp.zeros(seq.shape[:2], jnp.int32).at[rows, positions].set(labels)
  dense_weights = jnp.zeros(seq.shape[:2], jnp.float32).at[rows, positions].set(1.0)

  def loss_fn(params, seq):
    logits = head.apply({"params": params["head"]}, seq, params["embedding"])
    return _weighted_mean_xent(logits, dense_labels, dense_weights)

  return jax.value_and_grad(loss_fn, argnums=(0, 1))(params, seq)


def measure(step, args, repeats):
  """Compile `step`, return (median seconds per call, temp + output bytes, loss)."""
  compiled = jax.jit(step).lower(*args).compile()
  mem = compiled.memory_analysis()
  loss = float(jax.block_until_ready(compiled(*args))[0])  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), mem.temp_size_in_bytes + mem.output_size_in_bytes, loss


def run(batch, seq_len, preds, vocab, hidden, repeats):
  """One row of the table: both variants at one width."""
  config = bert.BertConfig(
    vocab_size=vocab, hidden=hidden, num_layers=1, num_heads=1, intermediate=hidden
  )
  head = bert.MlmHead(config)
  seq, positions, labels = make_inputs(batch, seq_len, preds, vocab, hidden)
  embedding = 0.02 * jax.random.normal(jax.random.key(1), (vocab, hidden), jnp.float32)
  head_params = head.init(jax.random.key(0), seq[:, :1], embedding)["params"]
  params = dict(head=head_params, embedding=embedding)
  results = {}
  for name, step in (("gathered", gathered_step), ("full", full_step)):
    fn = lambda p, s, step=step: step(head, p, s, positions, labels)  # noqa: E731
    results[name] = measure(fn, (params, seq), repeats)
  (t_g, m_g, loss_g), (t_f, m_f, loss_f) = results["gathered"], results["full"]
  if not np.isclose(loss_g, loss_f, rtol=1e-4):
    raise AssertionError(f"the two heads disagree: loss {loss_g} vs {loss_f}")
  return t_g, t_f, m_g, m_f


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="B=4, D=256, 3 repeats (seconds)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  batch, seq_len, preds, vocab = 32, 128, 20, 30522
  widths, repeats = (256, 768), args.repeats
  if args.quick:
    batch, widths, repeats = 4, (256,), 3
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})")
  print(
    f"B={batch} L={seq_len} P={preds} V={vocab}; median of {repeats} steps "
    "(fwd+bwd, head + loss); memory = XLA temp + output bytes\n"
  )
  print("| D | gathered ms | full ms | speed-up | gathered MiB | full MiB | memory saved |")
  print("|---|---|---|---|---|---|---|")
  for hidden in widths:
    t_g, t_f, m_g, m_f = run(batch, seq_len, preds, vocab, hidden, repeats)
    print(
      f"| {hidden} | {t_g * 1e3:.1f} | {t_f * 1e3:.1f} | {t_f / t_g:.1f}x "
      f"| {m_g / 2**20:.1f} | {m_f / 2**20:.1f} | {1 - m_g / m_f:.0%} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
