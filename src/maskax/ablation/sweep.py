"""Sweep bookkeeping: the grid of runs, their folders, and which of them are finished.

Words used throughout: a *cell* is one point of the grid (a value for every swept key, the seed
excluded); a *run* is one cell trained at one seed, in its own sub-workdir. Results are
aggregated per cell over its runs (`maskax.ablation.report`).

Files in a sweep's workdir:
  sweep.json            the grid (axes, seeds, runs and their folders, baseline cell, metrics):
                        what `python -m maskax.ablation.report DIR` rebuilds the results from.
  CELL,seed=S/          one run's workdir, e.g. `loss.keep_prob=0.5,seed=1`.
  CELL,seed=S/final.json  written when the run returns: its final metrics, config, last
                        checkpoint step and duration. A run is *finished* when final.json holds
                        the same config and its checkpoint still exists; a re-run skips it.
Plain dicts in and out, no JAX: the launcher owns ConfigDicts, the report reads these files.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import os
from typing import Any, Mapping, Sequence

from maskax.training import paths

MANIFEST_FILE = "sweep.json"
FINAL_FILE = "final.json"


@dataclasses.dataclass(frozen=True)
class Run:
  """One cell at one seed. `seed` is None when the seed is not swept (config.seed applies)."""

  cell: tuple[tuple[str, Any], ...]  # (key, value) for every swept key, in flag order
  seed: int | None

  @property
  def cell_name(self) -> str:
    return cell_name(self.cell)

  @property
  def dirname(self) -> str:
    seed = [] if self.seed is None else [("seed", self.seed)]
    return ",".join(f"{k}={v}" for k, v in [*self.cell, *seed]).replace("/", "_")

  def overrides(self) -> dict[str, Any]:
    """Config key -> value for this run, the seed included when it is swept."""
    return dict(self.cell) | ({} if self.seed is None else {"seed": self.seed})


def cell_name(cell: Sequence[tuple[str, Any]]) -> str:
  """`model.hidden=8,loss.mode=token_mean`; `all` for the grid of no swept key (seeds only)."""
  return ",".join(f"{k}={v}" for k, v in cell) or "all"


def parse_axis(spec: str, config: Mapping[str, Any]) -> tuple[str, list[Any]]:
  """`'loss.keep_prob=1.0,0.5'` -> `('loss.keep_prob', [1.0, 0.5])`, typed like the config
  field (`config` is flat: `runs.flatten` of the resolved config)."""
  if "=" not in spec:
    raise ValueError(f"--sweep={spec!r}: expected KEY=V1,V2,... e.g. --sweep=train.steps=10,20")
  key, raw = spec.split("=", 1)
  if key not in config:
    close = [k for k in config if k.split(".")[-1] == key.split(".")[-1]]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"--sweep: unknown config key {key!r}.{hint}")
  values = [convert(v.strip(), config[key], key) for v in raw.split(",") if v.strip()]
  if not values:
    raise ValueError(f"--sweep={spec!r}: give at least one value.")
  if len(set(map(str, values))) != len(values):
    raise ValueError(f"--sweep={spec!r}: a value is repeated; each run needs its own folder.")
  return key, values


def convert(text: str, current: Any, key: str) -> Any:
  """`text` as a value of the type of `current` (the config's value for `key`)."""
  kind = type(current)
  try:
    if kind is bool:
      if text.lower() not in ("true", "false"):
        raise ValueError
      return text.lower() == "true"
    if kind in (int, float):
      return kind(text)
    if kind is str or current is None:
      return text
    return kind(ast.literal_eval(text))
  except (ValueError, SyntaxError):
    raise ValueError(
      f"--sweep: value {text!r} is not a valid {kind.__name__} for {key!r}."
    ) from None


def parse_grid(
  specs: Sequence[str], config: Mapping[str, Any], *, seeds: int = 0
) -> tuple[list[tuple[str, list[Any]]], list[int] | None]:
  """`(axes, seeds)` from the --sweep flags and --seeds=N (flat `config`, as in `parse_axis`).

  `--sweep=seed=0,1,2` and `--seeds=3` both sweep the seed; it is kept apart from the axes
  because runs that differ only in seed are repeats of one cell, not different cells.
  """
  axes, seed_values = [], None
  for spec in specs:
    key, values = parse_axis(spec, config)
    if key in [k for k, _ in axes] or (key == "seed" and seed_values is not None):
      raise ValueError(f"--sweep: {key!r} is swept twice; give all its values in one flag.")
    if key == "seed":
      seed_values = values
    else:
      axes.append((key, values))
  if seeds:
    if seed_values is not None:
      raise ValueError("--seeds and --sweep=seed=... both set the seeds; use one of them.")
    if "seed" not in config:
      raise ValueError("--seeds: this experiment's config has no `seed` key.")
    seed_values = list(range(seeds))
  return axes, seed_values


def plan(axes: Sequence[tuple[str, Sequence[Any]]], seeds: Sequence[int] | None) -> list[Run]:
  """Every run of the grid, seed by seed: all cells at seed 0 come first, so a sweep stopped
  half-way has compared every cell at least once instead of repeating the first one."""
  keys = [k for k, _ in axes]
  cells = [tuple(zip(keys, values)) for values in itertools.product(*[v for _, v in axes])]
  return [Run(cell, seed) for seed in (seeds if seeds is not None else [None]) for cell in cells]


def find_cell(spec: str | None, runs: Sequence[Run], config: Mapping[str, Any]) -> str:
  """The name of the cell `--baseline=KEY=V[,KEY2=V2]` picks (the first cell when None)."""
  cells = {r.cell_name: dict(r.cell) for r in runs}
  if not spec:
    return next(iter(cells))
  wanted = {}
  for part in spec.split(","):
    key, _, text = part.partition("=")
    if key not in config:
      raise ValueError(f"--baseline: unknown config key {key!r}.")
    wanted[key] = str(convert(text.strip(), config[key], key))
  matches = [
    name
    for name, values in cells.items()
    if all(k in values and str(values[k]) == v for k, v in wanted.items())
  ]
  if len(matches) != 1:
    found = "no cell" if not matches else f"{len(matches)} cells"
    raise ValueError(
      f"--baseline={spec}: {found} of the sweep match; cells: " + "; ".join(cells) + "."
    )
  return matches[0]


def write_manifest(
  workdir: str, axes, seeds, runs: Sequence[Run], *, baseline: str, metrics: Sequence[str] | None
) -> None:
  manifest = {
    "axes": [[k, list(v)] for k, v in axes],
    "seeds": seeds,
    "baseline": baseline,
    "metrics": list(metrics) if metrics else None,
    "runs": [
      {"dir": r.dirname, "cell": r.cell_name, "seed": r.seed, "values": dict(r.cell)} for r in runs
    ],
  }
  _write_json(os.path.join(workdir, MANIFEST_FILE), manifest)


def read_manifest(workdir: str) -> dict | None:
  return _read_json(os.path.join(workdir, MANIFEST_FILE))


def last_checkpoint_step(workdir: str) -> int | None:
  steps = paths.committed_steps(os.path.join(workdir, "checkpoints"))
  return steps[-1] if steps else None


def write_final(
  workdir: str, metrics: Mapping[str, Any], config: Mapping[str, Any], *, duration_s: float
) -> None:
  """Records a returned run (see the module docstring for what makes it finished)."""
  _write_json(
    os.path.join(workdir, FINAL_FILE),
    {
      "metrics": dict(metrics),
      "config": config,
      "duration_s": round(duration_s, 3),
      "step": last_checkpoint_step(workdir),
    },
  )


def read_final(workdir: str) -> dict | None:
  return _read_json(os.path.join(workdir, FINAL_FILE))


def is_finished(workdir: str, config: Mapping[str, Any]) -> bool:
  """Whether `workdir` holds a run that returned under `config` and whose last checkpoint is
  still there (a run whose checkpoints were deleted is trained again, not trusted)."""
  final = read_final(workdir)
  if final is None or _canonical(final.get("config")) != _canonical(config):
    return False
  step = final.get("step")
  return step is None or paths.as_path(os.path.join(workdir, "checkpoints", str(step))).is_dir()


def _canonical(value) -> str:
  return json.dumps(value, sort_keys=True, default=str)


def _read_json(path: str):
  path = paths.as_path(path)
  if not path.exists():
    return None
  with path.open() as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  # Atomic, so a kill mid-write never leaves a half file that reads as finished.
  paths.write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str))
