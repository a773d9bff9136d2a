"""Metrics a program can read (JSON lines) and progress a person can watch (log lines).

Only process 0 writes: on a pod every process runs the same loop, and N copies of each line
would be noise (metrics are already global, computed on the global batch).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl` (empty list when there is none).

  A last line that does not parse is what a kill in the middle of a write leaves: it is dropped
  with a warning (the resumed run logs that step again). A bad line anywhere else is damage
  that dropping would hide, so it raises a ValueError naming the file and line.
  """
  return _read_records(os.path.join(workdir, METRICS_FILE))[0]


def _read_records(path: str) -> tuple[list[dict], bool]:
  """`(records, torn)`: torn says that a torn last line was dropped."""
  if not os.path.exists(path):
    return [], False
  with open(path) as f:
    lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
  # Without its newline, the last line would be glued to the next record appended.
  records, torn = [], bool(lines) and not lines[-1][1].endswith("\n")
  for i, (number, line) in enumerate(lines):
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise json.JSONDecodeError("not a JSON object", line, 0)
      records.append(record)
    except json.JSONDecodeError as e:
      if i + 1 < len(lines):
        raise ValueError(f"{path}, line {number}, is not valid JSON ({e.msg}); fix or delete "
                         "that line, then run again.") from None
      logging.warning("%s: dropped a torn last line (%d characters), as left by a process "
                      "killed while writing it.", path, len(line.rstrip("\n")))
      torn = True
  return records, torn


class MetricWriter:
  """Appends one JSON object per line: `{"step", "time", <metrics>...}`."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.active = jax.process_index() == 0
    if self.active and resume_step >= 0:
      self._truncate_after(resume_step)

  def _truncate_after(self, step: int) -> None:
    # A killed run may have logged steps past its last checkpoint; the resumed run recomputes
    # them, so drop those lines to keep one record per (step, kind).
    # A torn last line is dropped by read_metrics; rewriting then repairs the file.
    records, torn = _read_records(self.path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if torn or len(kept) != len(records):
      tmp = f"{self.path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)  # a kill during the rewrite leaves the old file whole

  def write(self, step: int, metrics: Mapping[str, float], *, elapsed: float) -> None:
    if not self.active:
      return
    record = {"step": int(step), "time": round(float(elapsed), 4)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _jsonable(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class Progress:
  """Prints `step i/N | key metrics | steps/s | ETA` at each log step."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.last_step = start_step
    self.last_time = time.perf_counter()

  def rate(self, step: int) -> float:
    """Steps per second since the previous call (then resets the window)."""
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return rate

  def line(self, step: int, metrics: Mapping[str, float], rate: float | None) -> str:
    """`rate=None` for evaluation lines, which have no speed or ETA."""
    shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
    if rate is None:
      return f"step {step}/{self.total}  {shown}"
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    return f"step {step}/{self.total}  {shown}  {rate:.2f} steps/s  ETA {_duration(eta)}"

  def log(self, step: int, metrics: Mapping[str, float], rate: float | None) -> None:
    if jax.process_index() == 0:
      logging.info("%s", self.line(step, metrics, rate))


def _fmt(v: float) -> str:
  return f"{v:.4g}"


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
