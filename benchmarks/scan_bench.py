"""Padded GRU/LSTM scan, forward + backward: maskax.rnn.scan.padded_scan vs flax.linen.RNN(seq_lengths).

Run: `python benchmarks/scan_bench.py` (B=64, T=100, F=256, D=256 and 512, lengths uniform in
[10, 100], seed 0) or `--quick` (tiny shapes, mostly compile time). Each row times
`grad(sum of valid outputs)` wrt params and x, jitted and warmed up, `--repeats` rounds with
every implementation timed once per round. Reports valid tokens/s and the speed-up over flax
four ways: ratio of median wall times, median of the per-round ratios (robust to load bursts),
ratio of best wall times, ratio of best CPU times; and useful GFLOP/s (matmul FLOPs of the
valid tokens only) against the measured peak of one large f32 matmul on this machine.
Measured numbers, with the machine and its load, are in the README ("Benchmarks").
"""

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskax.rnn import cells, scan


def time_calls(calls, repeats):
  """Per (fn, args): (median wall s, min wall s, min process CPU s, wall s per repeat).

  Timed round-robin, so repeat k of every call ran within about a second of the others.
  CPU time (all threads of this process) is reported too: on a shared, overloaded machine the
  wall clock mostly measures waiting for a core, CPU time the work done.
  """
  for fn, args in calls:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm up
  wall, cpu = [[] for _ in calls], [[] for _ in calls]
  for _ in range(repeats):
    for k, (fn, args) in enumerate(calls):
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[k].append(time.perf_counter() - start)
      cpu[k].append(time.process_time() - start_cpu)
  return [(statistics.median(w), min(w), min(c), w) for w, c in zip(wall, cpu)]


def matmul_peak_gflops(size, repeats):
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  median, best, *_ = time_calls([(jax.jit(lambda a: a @ a), (a,))], repeats)[0]
  return 2 * size**3 / median / 1e9, 2 * size**3 / best / 1e9


def flax_loss(cell, hidden):
  flax_cell = nn.GRUCell(hidden) if cell == "gru" else nn.OptimizedLSTMCell(hidden)
  rnn = nn.RNN(flax_cell)

  def loss(variables, x, lengths):
    y = rnn.apply(variables, x, seq_lengths=lengths)
    valid = jnp.arange(x.shape[1])[None] < lengths[:, None]
    return jnp.sum(jnp.where(valid[..., None], y, 0.0))  # flax leaves padding unzeroed

  return rnn, loss


def ours_loss(cell, **options):
  def loss(params, x, lengths):
    y, _ = scan.padded_scan(params, x, lengths, cell=cell, **options)
    return jnp.sum(y)

  return loss


def bench_config(cell, batch, steps, features, hidden, repeats, seed=0):
  rng = np.random.default_rng(seed)
  lengths = jnp.asarray(rng.integers(10, steps + 1, size=batch), jnp.int32)
  x = jnp.asarray(rng.standard_normal((batch, steps, features)), jnp.float32)
  rnn, loss_flax = flax_loss(cell, hidden)
  variables = rnn.init(jax.random.key(seed), x)
  from_flax = cells.gru_from_flax if cell == "gru" else cells.lstm_from_flax
  params = from_flax(variables["params"]["cell"])
  runs = {
    "flax nn.RNN": (loss_flax, variables),
    "ours scan": (ours_loss(cell), params),
    "ours skip_padding": (ours_loss(cell, skip_padding=True), params),
  }
  tokens = int(lengths.sum())
  gates = cells.GATES[cell]
  # Forward x@W_i and h@W_h, backward twice that (input and weight gradients).
  useful_flops = tokens * 3 * 2 * (features + hidden) * gates * hidden
  calls = [
    (jax.jit(jax.grad(loss, argnums=(0, 1))), (weights, x, lengths))
    for loss, weights in runs.values()
  ]
  return tokens, useful_flops, dict(zip(runs, time_calls(calls, repeats)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny config, seconds")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  if args.quick:
    batch, steps, features, hiddens, repeats, peak_size = 8, 20, 16, (16,), 3, 512
  else:
    batch, steps, features, hiddens, repeats, peak_size = 64, 100, 256, (256, 512), 5, 2048
  repeats = args.repeats or repeats
  print(f"devices: {jax.devices()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
  print(
    f"B={batch} T={steps} F={features}, lengths uniform in [10, {steps}], seed 0; "
    f"grad of sum(valid outputs) wrt params and x; {repeats} repeats, round-robin"
  )
  peak, peak_best = matmul_peak_gflops(peak_size, repeats)
  print(f"f32 matmul ({peak_size}^3): {peak:.1f} GFLOP/s median, {peak_best:.1f} best\n")
  print(
    "| cell | D | implementation | valid tok/s (median) | vs flax | vs flax (paired) "
    "| vs flax (best wall) | vs flax (CPU time) | useful GFLOP/s | % of matmul |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for cell in ("gru", "lstm"):
    for hidden in hiddens:
      tokens, flops, results = bench_config(cell, batch, steps, features, hidden, repeats)
      base = results["flax nn.RNN"]
      for name, (median, best, cpu, walls) in results.items():
        # Median over repeats of flax's time / ours in the same round: a load burst that
        # lasts a round slows both sides of one pair, not one side of the medians.
        paired = statistics.median(b / w for b, w in zip(base[3], walls))
        print(
          f"| {cell} | {hidden} | {name} | {tokens / median:,.0f} "
          f"| {base[0] / median:.2f}x | {paired:.2f}x | {base[1] / best:.2f}x "
          f"| {base[2] / cpu:.2f}x "
          f"| {flops / median / 1e9:.1f} "
          f"| {100 * flops / median / 1e9 / peak:.0f}% |",
          flush=True,
        )
  print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
  main()
