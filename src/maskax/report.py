"""Sweep results -> a Markdown table, a CSV table and a PNG plot.

Each run of a sweep contributes its final metrics (one table row) and its metrics.jsonl history
(one line per metric panel, plotted against step and against training wall time).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.4g}"
  return str(v)


def table_rows(key: str, runs: Sequence[tuple[Any, Mapping[str, float]]],
               columns: Sequence[str] | None = None) -> tuple[list[str], list[list[Any]]]:
  """Header and rows: one row per swept value, one column per final metric."""
  if columns is None:
    seen: dict[str, None] = {}
    for _, m in runs:
      seen.update(dict.fromkeys(m))
    columns = list(seen)
  header = [key] + list(columns)
  rows = [[value] + [metrics.get(c, float("nan")) for c in columns] for value, metrics in runs]
  return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write_tables(outdir: str, key: str, runs, columns=None) -> tuple[str, str]:
  """Writes results.md and results.csv; returns their paths."""
  header, rows = table_rows(key, runs, columns)
  md, csv_path = os.path.join(outdir, "results.md"), os.path.join(outdir, "results.csv")
  with open(md, "w") as f:
    f.write(markdown_table(header, rows))
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return md, csv_path


def curves(records: Sequence[Mapping[str, Any]], metric: str) -> tuple[list, list, list]:
  """(steps, times, values) of every record that holds `metric` as a number."""
  out = ([], [], [])
  for r in records:
    v = r.get(metric)
    if isinstance(v, (int, float)):
      out[0].append(r["step"])
      out[1].append(r.get("time", float("nan")))
      out[2].append(v)
  return out


def plot_sweep(path: str, key: str, histories: Sequence[tuple[Any, Sequence[Mapping]]],
               metrics: Sequence[str]) -> str:
  """One row of panels per metric: against step (left) and against wall time (right)."""
  metrics = [m for m in metrics if any(curves(h, m)[0] for _, h in histories)]
  if not metrics:
    raise ValueError("no metric to plot: the runs logged none of the requested metrics.")
  fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False)
  for row, metric in enumerate(metrics):
    for value, history in histories:
      steps, times, values = curves(history, metric)
      axes[row][0].plot(steps, values, marker=".", label=f"{key}={value}")
      axes[row][1].plot(times, values, marker=".", label=f"{key}={value}")
    axes[row][0].set_xlabel("step")
    axes[row][1].set_xlabel("training wall time (s)")
    for ax in axes[row]:
      ax.set_ylabel(metric)
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def default_metrics(histories) -> list[str]:
  """Every eval metric plus the training loss, in first-seen order."""
  seen: dict[str, None] = {}
  for _, history in histories:
    for r in history:
      seen.update({k: None for k in r if k.startswith("eval/")})
  return ["loss"] + list(seen)
