"""Running an experiment from the launcher: one run, a sweep, or a trained run put to use.

`run_one` locks the workdir, writes (or checks against) the resolved config and topology, runs
the experiment and records `final.json`; `run_sweep` does that for every run of a grid, after
checking every run's config; `use_trained` hands a trained run to the experiment's `predict` or
`export` with the config it trained with. launch.py turns its flags into `Options`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
import time

import jax
import ml_collections
from absl import logging

from maskax.ablation import report, sweep
from maskax.training import paths, progress, runs, workdir_lock


@dataclasses.dataclass(frozen=True)
class Options:
  """The launcher's flags that say how to run (launch.py documents each)."""

  allow_config_change: bool = False
  wait_for_workdir_s: int = 0
  sweep: tuple[str, ...] = ()  # KEY=V1,V2 axes of a grid
  seeds: int = 0
  baseline: str | None = None
  predict: str | None = None  # FILE or '-'
  predict_out: str = "predictions"
  export: str | None = None


TOPOLOGY = ("process_count", "device_count", "data_workers")


def topology() -> dict[str, int]:
  """What a resume must match: a different split changes reduction order and data sharding."""
  return {
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    # Each process loads its own shard of every batch in-process: no extra worker pool.
    "data_workers": jax.process_count(),
  }


def lock_workdir(workdir: str, options: Options):
  """The workdir's lock, taken by process 0 for every process (`maskax.training.workdir_lock`)."""
  return workdir_lock.hold(
    workdir,
    wait_s=options.wait_for_workdir_s,
    is_holder=jax.process_index() == 0,
    process_count=jax.process_count(),
  )


def run_one(module, config, workdir: str, options: Options) -> dict:
  """Locks `workdir`, writes (or checks) the resolved config, runs the experiment, and records
  its final metrics in `final.json` (what marks a sweep's run finished: `maskax.ablation.sweep`)."""
  runs.check_values(config.to_dict())
  with lock_workdir(workdir, options):
    runs.write_config(
      workdir,
      config.to_dict(),
      safe=getattr(module, "RESUME_SAFE_KEYS", ()),
      pinned=getattr(module, "RESUME_PINNED_KEYS", ()),
      allow_change=options.allow_config_change,
      is_writer=jax.process_index() == 0,
      topology=topology(),
      # An experiment whose global batches are the same for any process count (BERT's
      # prepared shards) may resume on another one.
      free_topology=TOPOLOGY if getattr(module, "RESUME_ANY_PROCESS_COUNT", False) else (),
    )
    started = time.perf_counter()
    final = module.run(config, workdir)
    if jax.process_index() == 0:
      sweep.write_final(workdir, final, config.to_dict(), duration_s=time.perf_counter() - started)
    return final


def with_values(config, values):
  """A copy of `config` with `values` ({dotted key: value}) set."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in values.items():
      *parents, leaf = key.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def run_sweep(module, config, workdir: str, options: Options) -> None:
  """Every run of the grid (--sweep axes x --seeds) in its own sub-workdir, skipping finished
  ones, then results.md/.csv/.png in `workdir` (`maskax.ablation.sweep`, `maskax.ablation.report`)."""
  flat = runs.flatten(config.to_dict())
  axes, seeds = sweep.parse_grid(options.sweep, flat, seeds=options.seeds)
  planned = sweep.plan(axes, seeds)
  # Every run's config is built and checked before the first one trains: a bad value in the
  # last cell must not surface hours into a sweep.
  configs = [with_values(config, r.overrides()) for r in planned]
  for cfg in configs:
    runs.check_values(cfg.to_dict())
  baseline = sweep.find_cell(options.baseline, planned, flat)
  subdirs = [os.path.join(workdir, r.dirname) for r in planned]
  with lock_workdir(
    workdir, options
  ):  # the sweep's own files (results.*); each run locks its folder
    if jax.process_index() == 0:
      sweep.write_manifest(
        workdir,
        axes,
        seeds,
        planned,
        baseline=baseline,
        metrics=getattr(module, "REPORT_METRICS", None),
      )
    todo = [
      i
      for i, (sub, cfg) in enumerate(zip(subdirs, configs))
      if not sweep.is_finished(sub, cfg.to_dict())
    ]
    if len(todo) < len(planned):
      logging.info(
        "sweep: %d of %d runs already finished (final.json); skipping them",
        len(planned) - len(todo),
        len(planned),
      )
    durations = []  # of the runs trained by this command: the ETA's unit
    for i in todo:
      eta = (
        math.fsum(durations) / len(durations) * (len(todo) - len(durations))
        if durations
        else math.inf
      )
      shown = ", ".join(f"{k}={v}" for k, v in planned[i].overrides().items())
      logging.info(
        "sweep run %d/%d (%s), ETA %s -> %s",
        i + 1,
        len(planned),
        shown,
        progress.format_duration(eta),
        subdirs[i],
      )
      started = time.perf_counter()
      run_one(module, configs[i], subdirs[i], options)
      durations.append(time.perf_counter() - started)
    if jax.process_index() == 0:
      md, csv_path, png = report.write_sweep_report(workdir)
      print(paths.as_path(md).read_text())
      print(f"wrote {md}, {csv_path}, {png}")


def trained_config(module, config, workdir: str):
  """The config to use the run in `workdir` with: the one it trained with (saved in its newest
  checkpoint), except for the keys the experiment lists in `PREDICT_KEYS` (dotted keys or
  subtrees, e.g. `temperature`, `decode`), which take their values from `config`, the command's
  (preset and --config.KEY flags): they say how to predict (sampling temperature, beam width),
  not what was trained. Every other key comes from the run, since the vocabulary, layer sizes
  or data a model was built with cannot change after training: a user's value there would
  build a model that does not fit the checkpoint, or read its inputs differently. Returns
  `config` unchanged when the workdir has no checkpoint (predict() then says so)."""
  saved = runs.checkpoint_run_record(workdir) if runs.has_checkpoint(workdir) else None
  if saved is None:
    return config
  keys = getattr(module, "PREDICT_KEYS", ())
  return with_values(
    ml_collections.ConfigDict(saved[0]["config"]),
    {
      k: v
      for k, v in runs.flatten(config.to_dict()).items()
      if any(k == p or k.startswith(p + ".") for p in keys)
    },
  )


def use_trained(module, name: str, config, workdir: str, options: Options) -> None:
  """--predict / --export: reads the run in `workdir` with `trained_config`, writes nothing
  there; --predict passes `out_dir` (--predict_out) to a predict() that takes one."""
  what = "predict" if options.predict else "export"
  if not hasattr(module, what):
    raise ValueError(f"experiment {name} has no {what}() yet; experiments with one: see README.")
  config = trained_config(module, config, workdir)
  if options.export:
    print(f"wrote {module.export(config, workdir, options.export)}")
    return
  if options.predict != "-" and not os.path.isfile(options.predict):
    raise FileNotFoundError(f"--predict={options.predict}: no such file (use - for stdin).")
  with sys.stdin if options.predict == "-" else open(options.predict) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if not lines:
    raise ValueError(f"--predict={options.predict} holds no input lines.")
  kwargs = {}
  if "out_dir" in inspect.signature(module.predict).parameters:  # its predictions are files
    out_dir = os.path.realpath(options.predict_out)
    # A local folder never lies in a URL workdir (and realpath would mangle the URL).
    inside = not paths.is_url(workdir) and os.path.commonpath(
      [out_dir, os.path.realpath(workdir)]
    ) == os.path.realpath(workdir)
    if inside:
      raise ValueError(
        f"--predict_out={options.predict_out} lies in the workdir {workdir}; "
        "predictions never go into the training record: pick another folder."
      )
    kwargs["out_dir"] = options.predict_out
  for record in module.predict(config, workdir, lines, **kwargs):
    print(json.dumps(record))
