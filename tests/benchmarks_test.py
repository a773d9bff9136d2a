"""Each benchmark runs end to end at --quick size and prints a table whose rows hold numbers.

Not a timing test (timings are never asserted): it keeps the benchmark scripts from rotting as
the library changes, and checks that each row measured something (positive, finite values).
"""

import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, _env


def _table(script, *args):
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", *args],
    cwd=ROOT,
    env=_env(1, None, xla_flags=""),  # compiled as a user's run is, not as the tests are
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [
    line.strip("|").split("|")
    for line in proc.stdout.splitlines()
    if line.startswith("|") and not line.startswith("|---")
  ]
  header, body = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
  assert body, proc.stdout
  return header, body


def _number(cell):
  return float(cell.rstrip("x%").replace(",", "").split()[0])


@pytest.mark.slow
@pytest.mark.parametrize(
  "script, column, rows",
  [
    ("scan_bench.py", "valid tok/s (median)", 6),  # 2 cells x 1 size (--quick) x 3 implementations
    ("mlm_head_bench.py", "speed-up", 1),
    ("bert_step_bench.py", "tokens/s", 3),  # bf16/f32 gathered, bf16 full
    ("bert_data_bench.py", "peak RSS MB", 7),  # --quick: one corpus, prepare/load/in-memory rows
  ],
)
def test_benchmark_prints_a_measured_table(script, column, rows):
  header, body = _table(script)
  assert len(body) == rows
  values = [_number(row[header.index(column)]) for row in body]
  assert all(math.isfinite(v) and v > 0 for v in values), values
