"""A sweep's results over seeds (results.md, results.csv, results.png), or one run's curves.

  python -m maskax.ablation.report DIR   # DIR: a sweep's workdir (sweep.json) or a run's (metrics.jsonl)

For a sweep, every reported metric of every cell gets its mean, standard deviation, n and a 95%
Student t interval over seeds, and its difference to the baseline cell paired by seed, with its
own interval (`maskax.ablation.stats`). The tables are rebuilt from files alone: sweep.json (the grid,
`maskax.ablation.sweep`) and each run's final.json, so they can be redrawn while a sweep is still
running (unfinished runs are listed, not counted). The plot shows each cell's mean curve with a
band of one standard deviation over seeds: the spread a reader sees; the tables carry the
intervals, which at 3 seeds are 2.5 times wider and would drown the figure.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402

from maskax.ablation import stats, sweep  # noqa: E402
from maskax.training import paths  # noqa: E402

CONFIDENCE = 0.95
CSV_COLUMNS = (
  "metric",
  "n",
  "mean",
  "std",
  "ci_low",
  "ci_high",
  "diff_n",
  "diff_mean",
  "diff_ci_low",
  "diff_ci_high",
)


def _fmt(v: Any, sign: bool = False) -> str:
  if isinstance(v, float):
    return "nan" if math.isnan(v) else (f"{v:+.4g}" if sign else f"{v:.4g}")
  return str(v)


def load_sweep(workdir: str) -> tuple[dict, dict[str, dict | None]]:
  """`(manifest, finals)`: sweep.json and each run folder's final metrics (None: unfinished).

  A sweep folder without sweep.json (written before it existed) is read from its run folders:
  each sub-folder with a metrics.jsonl is a run, its cell the folder name less `,seed=S`.
  """
  manifest = sweep.read_manifest(workdir)
  if manifest is None:
    manifest = _infer_manifest(workdir)
  finals = {}
  for r in manifest["runs"]:
    final = sweep.read_final(os.path.join(workdir, r["dir"]))
    finals[r["dir"]] = final["metrics"] if final else None
  return manifest, finals


def _infer_manifest(workdir: str) -> dict:
  runs = []
  for name in sorted(p.name for p in paths.as_path(workdir).iterdir()):
    if paths.as_path(os.path.join(workdir, name, "metrics.jsonl")).is_file():
      match = re.fullmatch(r"(?:(.*),)?seed=(\d+)", name)
      cell, seed = (match[1] or "all", int(match[2])) if match else (name, None)
      runs.append({"dir": name, "cell": cell, "seed": seed, "values": {}})
  if not runs:
    raise FileNotFoundError(
      f"{workdir} holds no sweep (sweep.json or run folders with "
      "metrics.jsonl) and no run (metrics.jsonl)."
    )
  return {"axes": [], "seeds": None, "baseline": runs[0]["cell"], "metrics": None, "runs": runs}


def reported_metrics(manifest: Mapping, finals: Mapping[str, dict | None]) -> list[str]:
  """The experiment's REPORT_METRICS when it named them, else every numeric final metric."""
  if manifest.get("metrics"):
    return list(manifest["metrics"])
  seen: dict[str, None] = {}
  for final in finals.values():
    seen.update(
      {
        k: None
        for k, v in (final or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
      }
    )
  return list(seen)


def summarize_sweep(
  manifest: Mapping, finals: Mapping[str, dict | None], metrics: Sequence[str]
) -> list[dict]:
  """One row per (cell, metric): `{"cell", "values", "metric", "summary", "diff"}`, where
  summary is over the cell's finished runs and diff (None for the baseline itself) is the
  cell minus the baseline cell, paired by seed."""
  by_cell: dict[str, dict] = {}
  for r in manifest["runs"]:
    cell = by_cell.setdefault(r["cell"], {"values": r["values"], "finals": {}})
    if finals.get(r["dir"]) is not None:
      cell["finals"][r["seed"] if r["seed"] is not None else 0] = finals[r["dir"]]
  baseline = by_cell.get(manifest["baseline"], {"finals": {}})["finals"]
  rows = []
  for metric in metrics:
    base = {s: _number(f.get(metric)) for s, f in baseline.items()}
    for name, cell in by_cell.items():
      values = {s: _number(f.get(metric)) for s, f in cell["finals"].items()}
      diff = (
        None if name == manifest["baseline"] else stats.paired_difference(values, base, CONFIDENCE)
      )
      rows.append(
        {
          "cell": name,
          "values": cell["values"],
          "metric": metric,
          "diff": diff,
          "summary": stats.summarize(list(values.values()), CONFIDENCE),
        }
      )
  return rows


def _number(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):  # absent, or a non-finite value stored as text
    return math.nan


def _key_columns(manifest: Mapping) -> list[str]:
  return [k for k, _ in manifest["axes"]] or ["cell"]


def _key_values(manifest: Mapping, row: Mapping) -> list[Any]:
  keys = [k for k, _ in manifest["axes"]]
  return [row["values"].get(k) for k in keys] if keys else [row["cell"]]


def markdown(manifest: Mapping, rows: Sequence[Mapping], unfinished: Sequence[str]) -> str:
  seeds = manifest.get("seeds")
  lines = [
    "# Sweep results",
    "",
    f"Seeds: {', '.join(map(str, seeds)) if seeds else 'one per cell (not swept)'}. "
    f"Intervals: {CONFIDENCE:.0%} Student t over seeds, mean ± t(n-1)·std/√n. "
    f"Δ: the cell minus the baseline cell `{manifest['baseline']}`, paired by seed; "
    "an interval that contains 0 means the difference is within seed noise.",
    "",
  ]
  if unfinished:
    lines += [f"Not counted (no final.json yet): {', '.join(unfinished)}.", ""]
  keys = _key_columns(manifest)
  for metric in dict.fromkeys(r["metric"] for r in rows):
    lines += [
      f"## {metric}",
      "",
      "| "
      + " | ".join(keys + ["mean", "std", "n", "95% CI", "Δ vs baseline", "Δ 95% CI", "Δ vs noise"])
      + " |",
      "|" + "---|" * (len(keys) + 7),
    ]
    for row in (r for r in rows if r["metric"] == metric):
      s, d = row["summary"], row["diff"]
      cells = [_fmt(v) for v in _key_values(manifest, row)]
      cells += [_fmt(s.mean), _fmt(s.std), str(s.n), f"[{_fmt(s.low)}, {_fmt(s.high)}]"]
      if d is None:
        cells += ["baseline", "", ""]
      else:
        verdict = "" if d.n < 2 else ("differs" if d.excludes_zero() else "within noise")
        cells += [_fmt(d.mean, sign=True), f"[{_fmt(d.low, True)}, {_fmt(d.high, True)}]", verdict]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def write_csv(path: str, manifest: Mapping, rows: Sequence[Mapping]) -> None:
  """One line per (cell, metric), machine-readable: key columns, then `CSV_COLUMNS`."""
  # Built in memory and written once, as bytes: an epath file takes no `newline=""` (csv ends
  # its lines in \r\n itself), and an object is written whole anyway.
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer)
  writer.writerow(_key_columns(manifest) + list(CSV_COLUMNS))
  nan = math.nan
  for row in rows:
    s, d = row["summary"], row["diff"]
    writer.writerow(
      _key_values(manifest, row)
      + [
        row["metric"],
        s.n,
        s.mean,
        s.std,
        s.low,
        s.high,
        *((d.n, d.mean, d.low, d.high) if d is not None else (0, nan, nan, nan)),
      ]
    )
  paths.as_path(path).write_bytes(buffer.getvalue().encode())


def curves(records: Sequence[Mapping[str, Any]], metric: str) -> dict[int, tuple[float, float]]:
  """`{step: (time, value)}` of every record that holds `metric` as a number."""
  return {
    r["step"]: (r.get("time", math.nan), float(r[metric]))
    for r in records
    if isinstance(r.get(metric), (int, float))
  }


def default_metrics(histories: Sequence[Sequence[Mapping]]) -> list[str]:
  """The training loss plus every eval metric, in first-seen order."""
  seen: dict[str, None] = {}
  for history in histories:
    for r in history:
      seen.update({k: None for k in r if k.startswith("eval/")})
  return ["loss"] + list(seen)


def plot(
  path: str, groups: Sequence[tuple[str, Sequence[Sequence[Mapping]]]], metrics: Sequence[str]
) -> str:
  """One row of panels per metric, against step (left) and training wall time (right): per
  group (a cell) the mean over its histories (seeds) at the steps all of them logged, with a
  band of one standard deviation where there are two or more."""
  metrics = [m for m in metrics if any(curves(h, m) for _, hs in groups for h in hs)]
  if not metrics:
    raise ValueError("no metric to plot: the runs logged none of the requested metrics.")
  over_seeds = any(len(histories) > 1 for _, histories in groups)
  fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False)
  for row, metric in enumerate(metrics):
    for label, histories in groups:
      per_seed = [curves(h, metric) for h in histories]
      steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
      if not steps:
        continue
      summaries = [stats.summarize([c[s][1] for c in per_seed]) for s in steps]
      mean = [x.mean for x in summaries]
      times = [math.fsum(c[s][0] for c in per_seed) / len(per_seed) for s in steps]
      std = [x.std if len(per_seed) > 1 else 0.0 for x in summaries]
      for ax, xs in zip(axes[row], (steps, times)):
        label_n = f"{label} (n={len(per_seed)})" if over_seeds else label
        if len(xs) == 1:  # a band needs two x values: an error bar shows one point's spread
          ax.errorbar(xs, mean, yerr=std, marker="o", capsize=4, label=label_n)
          continue
        (line,) = ax.plot(xs, mean, marker=".", label=label_n)
        ax.fill_between(
          xs,
          [m - d for m, d in zip(mean, std)],
          [m + d for m, d in zip(mean, std)],
          color=line.get_color(),
          alpha=0.2,
        )
    axes[row][0].set_xlabel("step")
    axes[row][1].set_xlabel("training wall time (s)")
    for ax in axes[row]:
      ax.set_ylabel(metric)
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  if over_seeds:
    axes[0][0].set_title("mean over seeds ± 1 std", fontsize=9)
  fig.tight_layout()
  # Through a file object, so that the figure can go to a URL; the name's extension still picks
  # the format, as it does for savefig(path).
  with paths.as_path(path).open("wb") as f:
    fig.savefig(f, format=os.path.splitext(path)[1][1:] or None, dpi=110)
  plt.close(fig)
  return path


def write_sweep_report(workdir: str) -> tuple[str, str, str]:
  """results.md, results.csv and results.png in the sweep's `workdir`; returns their paths."""
  from maskax.training import progress  # JAX comes with it: only once there is something to read

  manifest, finals = load_sweep(workdir)
  if not any(f is not None for f in finals.values()):
    raise FileNotFoundError(f"{workdir}: no run of the sweep has finished (no final.json).")
  metrics = reported_metrics(manifest, finals)
  rows = summarize_sweep(manifest, finals, metrics)
  unfinished = [d for d, f in finals.items() if f is None]
  md, csv_path = os.path.join(workdir, "results.md"), os.path.join(workdir, "results.csv")
  paths.as_path(md).write_text(markdown(manifest, rows, unfinished))
  write_csv(csv_path, manifest, rows)
  groups: dict[str, list] = {}
  for r in manifest["runs"]:
    groups.setdefault(r["cell"], []).append(progress.read_metrics(os.path.join(workdir, r["dir"])))
  all_histories = [h for hs in groups.values() for h in hs]
  plotted = [m for m in metrics if any(curves(h, m) for h in all_histories)]
  png = plot(
    os.path.join(workdir, "results.png"),
    list(groups.items()),
    plotted or default_metrics(all_histories),
  )
  return md, csv_path, png


def write_run_report(workdir: str) -> str:
  """One run's curves (every eval metric and the loss) as `workdir/results.png`."""
  from maskax.training import progress

  records = progress.read_metrics(workdir)
  return plot(
    os.path.join(workdir, "results.png"),
    [(os.path.basename(workdir.rstrip("/")), [records])],
    default_metrics([records]),
  )


def main(argv: Sequence[str]) -> int:
  if len(argv) != 1:
    print(
      "usage: python -m maskax.ablation.report DIR  (a sweep's or a run's workdir)", file=sys.stderr
    )
    return 2
  workdir = argv[0]
  try:
    paths.check_backend(workdir, "DIR")
    if not paths.as_path(workdir).is_dir():
      raise FileNotFoundError(f"{workdir} is not a directory.")
    if (
      sweep.read_manifest(workdir) is None
      and paths.as_path(os.path.join(workdir, "metrics.jsonl")).is_file()
    ):
      print(f"wrote {write_run_report(workdir)}")
      return 0
    md, csv_path, png = write_sweep_report(workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(paths.as_path(md).read_text())
  print(f"wrote {md}, {csv_path}, {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
