"""The only entry point of maskax: flags, config, multi-host start, one run or a sweep.

  python launch.py --config=experiments/bert_pretrain.py              # the main job
  python launch.py --config=experiments/char_rnn.py:smoke --config.train.steps=50 --workdir=runs/x
  python launch.py --config=experiments/fcn_segmentation.py --sweep=loss.keep_prob=1.0,0.5,0.25
  python launch.py --config=experiments/example_regression.py:smoke --sweep=model.hidden=8,16 \
      --sweep=loss.mode=token_mean,sequence_mean --seeds=3 --workdir=runs/grid  # 2x2 cells x 3
  python launch.py --config=/any/path/my_experiment.py:smoke                    # any config file
  python launch.py --list                                              # experiments and presets

--config takes any experiment file, relative to the current directory or else to the repository
root; `--list` shows the files in experiments/ that define `get_config`. A sweep trains every
run of its grid (each --sweep flag is one axis; --seeds=N repeats every cell with seeds 0..N-1)
in a sub-workdir named after its values, skips runs that already finished, and writes
results.md/.csv/.png with means and 95% intervals over seeds (see maskax.ablation.sweep, maskax.ablation.report;
`python -m maskax.ablation.report WORKDIR` redraws them, also while the sweep runs).

Re-running the same command resumes from the workdir's newest intact checkpoint. A run holds the
workdir's lock (`WORKDIR/run.lock`) from start to exit, so a second launch into it fails at once
naming the holder (--wait_for_workdir_s waits for it instead). The resolved config is written to
`WORKDIR/config.json` and the process/device counts to `topology.json`, and both travel inside
every checkpoint; a resume that differs in a key that changes numerics or data order, or in
topology, stops with a diff (pass --allow_config_change to go on anyway). SIGTERM (a preemption
notice) saves a checkpoint at the same step on every process and exits 0.

Multi-host (one command per host; JAX detects the flags on TPU pods, SLURM and Open MPI):
  python launch.py --config=... --workdir=SHARED_DIR --coordinator_address=HOST0:PORT \
      --num_processes=N --process_id=I [--heartbeat_timeout_s=30]
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.realpath(__file__))
EXPERIMENTS_DIR = os.path.join(ROOT, "experiments")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "PATH.py[:preset], any experiment file (relative to the current directory, "
  "else to the repository root); override fields with --config.KEY=VALUE.",
  lock_config=True,
)
flags.DEFINE_string(
  "workdir",
  None,
  "Run folder (default runs/NAME/PRESET): config, metrics, "
  "checkpoints, sweep results. Re-running resumes from it.",
)
flags.DEFINE_bool("list", False, "List every experiment with its presets and purpose, then exit.")
flags.DEFINE_multi_string(
  "sweep",
  None,
  "KEY=V1,V2,...: one axis of a grid (repeat the flag "
  "for more); one sub-workdir per run, then results.md, results.csv "
  "and results.png in --workdir.",
)
flags.DEFINE_integer(
  "seeds",
  0,
  "Repeat every sweep cell with seeds 0..N-1 (the same as "
  "--sweep=seed=0,...,N-1): the results then give mean, std and a 95% "
  "interval over seeds.",
)
flags.DEFINE_string(
  "baseline",
  None,
  "KEY=V[,KEY2=V2]: the sweep cell every other is compared "
  "with, paired by seed (default: the first cell).",
)
flags.DEFINE_integer("seed", None, "Overrides config.seed.")
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume even if the config changed in a key that alters numerics or data order.",
)
flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "yes", "no"],
  "Call jax.distributed.initialize(): 'auto' does when coordinator flags are "
  "given or a TPU pod / SLURM job with several hosts is detected.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_integer(
  "heartbeat_timeout_s",
  100,
  "Multi-host: a process that sends no heartbeat "
  "for this long is declared dead and every other process exits non-zero "
  "(lower it so a lost host ends the job quickly instead of hanging it).",
)
flags.DEFINE_integer(
  "initialization_timeout_s",
  300,
  "Multi-host: how long to wait for every process to join at start-up.",
)
flags.DEFINE_bool("verbose_errors", False, "Show full tracebacks for configuration errors.")
flags.DEFINE_string(
  "predict",
  None,
  "Use the trained run in --workdir on FILE ('-': stdin), one "
  "input per line; prints one JSON line per input. Writes nothing to the "
  "workdir. For experiments that define predict().",
)
flags.DEFINE_string(
  "predict_out",
  "predictions",
  "Folder (outside --workdir) where --predict "
  "writes the files of experiments whose predictions are files (label PNGs, "
  ".npz arrays); the JSON lines name them.",
)
flags.DEFINE_string(
  "export",
  None,
  "Write the trained run in --workdir to this folder in the "
  "ecosystem's format (BERT: Hugging Face BertForPreTraining). For experiments "
  "that define export().",
)
flags.DEFINE_integer(
  "wait_for_workdir_s",
  0,
  "When another live run holds the workdir's lock, "
  "wait up to this many seconds for it to end (a re-queued job whose "
  "predecessor is still saving) instead of failing at once.",
)


def experiment_files() -> dict[str, str]:
  """Name -> path of every file in experiments/ that defines `get_config` (common.py, shared
  defaults, does not). Read with `ast`, so that listing imports no experiment (nor JAX)."""
  found = {}
  for name in sorted(os.listdir(EXPERIMENTS_DIR)):
    path = os.path.join(EXPERIMENTS_DIR, name)
    if name.endswith(".py") and any(
      isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in _parse(path).body
    ):
      found[name[:-3]] = path
  return found


def _parse(path: str) -> ast.Module:
  with open(path) as f:
    return ast.parse(f.read(), path)


def list_experiments() -> str:
  """Every experiment with its presets and the question it answers."""
  lines = []
  for name, path in experiment_files().items():
    tree = _parse(path)
    purpose = (ast.get_docstring(tree) or "").strip().splitlines()[:1]
    lines.append(f"{name}: {''.join(purpose)}")
    lines += [f"    :{preset:<10} {text}" for preset, text in _presets(tree, path).items()]
  return "\n".join(lines)


def _presets(tree: ast.Module, path: str) -> dict[str, str]:
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      getattr(t, "id", None) == "PRESETS" for t in node.targets
    ):
      try:
        return ast.literal_eval(node.value)
      except ValueError:  # built by code: import the module to read it
        return load_experiment(path).PRESETS
  return {}


def resolve_config_path(path: str) -> str | None:
  """`path` relative to the current directory, else to the repository root (None: neither)."""
  for candidate in (path, os.path.join(ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.realpath(candidate)
  return None


def load_experiment(path: str):
  """The module of the config file `path`.

  A file in experiments/ is imported as `experiments.NAME`, the module tests and benchmarks
  import too; any other file under a name of its own. The repository root goes on sys.path
  either way, so that a config file anywhere can `from experiments import common`.
  """
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  path = os.path.realpath(path)
  name = os.path.splitext(os.path.basename(path))[0]
  if os.path.dirname(path) == os.path.realpath(EXPERIMENTS_DIR):
    return importlib.import_module(f"experiments.{name}")
  module_name = f"maskax_config_{name}"
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look modules up by name
    spec.loader.exec_module(module)
  return sys.modules[module_name]


def _config_arg(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _with_config_arg(argv, value: str) -> list[str]:
  """A copy of `argv` whose --config (`--config=V` or `--config V`) holds `value`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = f"--config={value}"
      break
    if arg == "--config" and i + 1 < len(out):
      out[i + 1] = value
      break
  return out


def precheck_config_arg(argv) -> list[str]:
  """`argv` with --config's file made absolute (ml_collections reads it relative to the current
  directory only); exits with what exists when --config names a missing file, preset or key."""
  value = _config_arg(argv)
  if value is None:
    return list(argv)
  path, _, preset = value.partition(":")
  resolved = resolve_config_path(path)
  if resolved is None:
    sys.exit(
      f"error: unknown experiment {path!r} (no such file here or under {ROOT}). "
      "Experiments: "
      + ", ".join(os.path.relpath(p, ROOT) for p in experiment_files().values())
      + " (see --list)."
    )
  module = load_experiment(resolved)
  name = os.path.splitext(os.path.basename(resolved))[0]
  if not callable(getattr(module, "get_config", None)):
    sys.exit(f"error: {path} defines no get_config(arg=''): it is not an experiment.")
  presets = getattr(module, "PRESETS", None)
  if preset and presets is not None and preset not in presets:
    sys.exit(
      f"error: experiment {name!r} has no preset {preset!r}. Presets: "
      + ", ".join(presets)
      + f" (use --config={path}:PRESET or no preset)."
    )
  from maskax.training import runs

  try:
    known_keys = runs.flatten(module.get_config(preset).to_dict())
  except ValueError as e:  # e.g. an unknown preset of a config without PRESETS
    sys.exit(f"error: {e}")
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config.") :].split("=", 1)[0]
      if key not in known_keys and not any(k.startswith(key + ".") for k in known_keys):
        leaf = key.split(".")[-1]
        close = [k for k in known_keys if k.split(".")[-1][:3] == leaf[:3]]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        sys.exit(
          f"error: unknown config key {key!r} for {name}.{hint} "
          f"All keys: see get_config() in {resolved}."
        )
  return _with_config_arg(argv, f"{resolved}:{preset}" if preset else resolved)


def maybe_initialize_distributed() -> bool:
  """jax.distributed.initialize() before any other JAX call, when this is a multi-process job.

  'auto' starts it when coordinator flags are given or the environment names several SLURM
  tasks, Open MPI ranks or TPU workers; `--distributed=yes` always does. Flags left unset are
  then filled in by JAX's cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes).
  Returns whether it initialized.
  """
  explicit = FLAGS.coordinator_address is not None or FLAGS.num_processes is not None
  detected = (
    int(os.environ.get("SLURM_NTASKS", "1")) > 1
    or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )
  if FLAGS.distributed == "no" or (FLAGS.distributed == "auto" and not (explicit or detected)):
    return False
  import jax

  # CPU processes need a cross-process collectives library (GPU uses NCCL, TPU its ICI/DCN);
  # the option is ignored by other backends.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's preemption service would take SIGTERM for itself; maskax.training.preemption handles it the
  # same way with or without jax.distributed (see that module).
  jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(
    coordinator_address=FLAGS.coordinator_address,
    num_processes=FLAGS.num_processes,
    process_id=FLAGS.process_id,
    heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s,
    initialization_timeout=FLAGS.initialization_timeout_s,
  )
  return True


def topology() -> dict[str, int]:
  """What a resume must match: a different split changes reduction order and data sharding."""
  import jax

  return {
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    # Each process loads its own shard of every batch in-process: no extra worker pool.
    "data_workers": jax.process_count(),
  }


def lock_workdir(workdir: str):
  """The workdir's lock, taken by process 0 for every process (`maskax.training.workdir_lock`)."""
  import jax
  from maskax.training import workdir_lock

  return workdir_lock.hold(
    workdir,
    wait_s=FLAGS.wait_for_workdir_s,
    is_holder=jax.process_index() == 0,
    process_count=jax.process_count(),
  )


def run_one(module, config, workdir: str) -> dict:
  """Locks `workdir`, writes (or checks) the resolved config, runs the experiment, and records
  its final metrics in `final.json` (what marks a sweep's run finished: `maskax.ablation.sweep`)."""
  import jax
  from maskax.ablation import sweep
  from maskax.training import runs

  runs.check_values(config.to_dict())
  with lock_workdir(workdir):
    runs.write_config(
      workdir,
      config.to_dict(),
      safe=getattr(module, "RESUME_SAFE_KEYS", ()),
      pinned=getattr(module, "RESUME_PINNED_KEYS", ()),
      allow_change=FLAGS.allow_config_change,
      is_writer=jax.process_index() == 0,
      topology=topology(),
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


def run_sweep(module, config, workdir: str) -> None:
  """Every run of the grid (--sweep axes x --seeds) in its own sub-workdir, skipping finished
  ones, then results.md/.csv/.png in `workdir` (`maskax.ablation.sweep`, `maskax.ablation.report`)."""
  import jax
  from maskax.ablation import report, sweep
  from maskax.training import progress, runs

  flat = runs.flatten(config.to_dict())
  axes, seeds = sweep.parse_grid(FLAGS.sweep or [], flat, seeds=FLAGS.seeds)
  planned = sweep.plan(axes, seeds)
  # Every run's config is built and checked before the first one trains: a bad value in the
  # last cell must not surface hours into a sweep.
  configs = [with_values(config, r.overrides()) for r in planned]
  for cfg in configs:
    runs.check_values(cfg.to_dict())
  baseline = sweep.find_cell(FLAGS.baseline, planned, flat)
  subdirs = [os.path.join(workdir, r.dirname) for r in planned]
  with lock_workdir(workdir):  # the sweep's own files (results.*); each run locks its folder
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
      run_one(module, configs[i], subdirs[i])
      durations.append(time.perf_counter() - started)
    if jax.process_index() == 0:
      md, csv_path, png = report.write_sweep_report(workdir)
      with open(md) as f:
        print(f.read())
      print(f"wrote {md}, {csv_path}, {png}")


class _QuietLibraries:
  """Drops INFO lines of orbax and JAX (dozens per checkpoint) so progress lines stay readable."""

  def filter(self, record) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/jax/", "/jaxlib/"))
    return record.levelno >= 30 or not noisy  # 30 = std logging.WARNING (absl numbers differ)


def trained_config(module, config, workdir: str):
  """The config to use the run in `workdir` with: the one it trained with (saved in its newest
  checkpoint), except for the keys the experiment lists in `PREDICT_KEYS` (dotted keys or
  subtrees, e.g. `temperature`, `decode`), which take their values from `config`, the command's
  (preset and --config.KEY flags): they say how to predict (sampling temperature, beam width),
  not what was trained. Every other key comes from the run, since the vocabulary, layer sizes
  or data a model was built with cannot change after training: a user's value there would
  build a model that does not fit the checkpoint, or read its inputs differently. Returns
  `config` unchanged when the workdir has no checkpoint (predict() then says so)."""
  import ml_collections
  from maskax.training import runs

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


def use_trained(module, name: str, config, workdir: str) -> None:
  """--predict / --export: reads the run in `workdir` with `trained_config`, writes nothing
  there; --predict passes `out_dir` (--predict_out) to a predict() that takes one."""
  import inspect
  import json

  what = "predict" if FLAGS.predict else "export"
  if not hasattr(module, what):
    raise ValueError(f"experiment {name} has no {what}() yet; experiments with one: see README.")
  config = trained_config(module, config, workdir)
  if FLAGS.export:
    print(f"wrote {module.export(config, workdir, FLAGS.export)}")
    return
  if FLAGS.predict != "-" and not os.path.isfile(FLAGS.predict):
    raise FileNotFoundError(f"--predict={FLAGS.predict}: no such file (use - for stdin).")
  with sys.stdin if FLAGS.predict == "-" else open(FLAGS.predict) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if not lines:
    raise ValueError(f"--predict={FLAGS.predict} holds no input lines.")
  options = {}
  if "out_dir" in inspect.signature(module.predict).parameters:  # its predictions are files
    out_dir = os.path.realpath(FLAGS.predict_out)
    if os.path.commonpath([out_dir, os.path.realpath(workdir)]) == os.path.realpath(workdir):
      raise ValueError(
        f"--predict_out={FLAGS.predict_out} lies in the workdir {workdir}; "
        "predictions never go into the training record: pick another folder."
      )
    options["out_dir"] = FLAGS.predict_out
  for record in module.predict(config, workdir, lines, **options):
    print(json.dumps(record))


def main(argv):
  # Library records reach the absl handler through several loggers; filter where they all end.
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.list:
    print(list_experiments())
    return 0
  if FLAGS.config is None:
    raise app.UsageError(
      "--config is required, e.g. --config=experiments/bert_pretrain.py (see --list)."
    )
  maybe_initialize_distributed()
  import jax  # only after distributed init: no JAX call may come before it.
  from maskax.training import runs
  from maskax.training.preemption import Preempted

  path, _, preset = _config_arg(sys.argv).partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  module = load_experiment(path)
  config = FLAGS.config
  sweeping = bool(FLAGS.sweep or FLAGS.seeds)
  if FLAGS.baseline and not sweeping:
    raise app.UsageError("--baseline names a cell of a sweep: add --sweep or --seeds.")
  if FLAGS.seed is not None:
    if FLAGS.seeds or any(s.startswith("seed=") for s in FLAGS.sweep or []):
      raise app.UsageError("--seed sets one seed, --seeds/--sweep=seed=... several: use one.")
    config.seed = FLAGS.seed
  workdir = FLAGS.workdir or os.path.join("runs", name, preset or "default")
  runs.check_workdir(workdir)
  logging.info(
    "experiment %s, preset %s, workdir %s, %d device(s) on %d process(es)",
    name,
    preset or "default",
    workdir,
    jax.device_count(),
    jax.process_count(),
  )
  if FLAGS.predict or FLAGS.export:
    return use_trained(module, name, config, workdir) or 0
  try:
    if sweeping:
      run_sweep(module, config, workdir)
    else:
      print(runs.format_final(run_one(module, config, workdir)))
  except Preempted as e:  # the checkpoint is committed: a clean exit lets the scheduler requeue
    logging.warning("%s", e)
    print(e)
    return 0
  return 0


def run():
  # Check --config before absl parses it, so a typo lists what exists instead of a traceback.
  sys.argv[:] = precheck_config_arg(sys.argv)
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
    if FLAGS.is_parsed() and FLAGS.verbose_errors:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
