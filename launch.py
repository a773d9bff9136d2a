"""The only entry point of maskax: flags, config, multi-host start, one run or a sweep.

  python launch.py --config=experiments/bert_pretrain.py              # the main job
  python launch.py --config=experiments/char_rnn.py:smoke --config.train.steps=50 --workdir=runs/x
  python launch.py --config=experiments/fcn_segmentation.py --sweep=loss.keep_prob=1.0,0.5,0.25
  python launch.py --list                                              # experiments and presets

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

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Experiment name -> module file. The launcher imports only the one it runs.
EXPERIMENTS = {
    "bert_pretrain": "experiments/bert_pretrain.py",
    "char_rnn": "experiments/char_rnn.py",
    "padded_gru": "experiments/padded_gru.py",
    "feature_mask": "experiments/feature_mask.py",
    "seq2seq": "experiments/seq2seq.py",
    "fcn_segmentation": "experiments/fcn_segmentation.py",
    "example_regression": "experiments/example_regression.py",
}
ROOT = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "experiments/NAME.py[:preset]; override fields with --config.KEY=VALUE.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (default runs/NAME/PRESET): config, metrics, "
                    "checkpoints, sweep results. Re-running resumes from it.")
flags.DEFINE_bool("list", False, "List every experiment with its presets and purpose, then exit.")
flags.DEFINE_string("sweep", None, "KEY=V1,V2,...: one sub-workdir per value, then a comparison "
                    "(results.md, results.csv, results.png).")
flags.DEFINE_integer("seed", None, "Overrides config.seed.")
flags.DEFINE_bool("allow_config_change", False, "Resume even if the config changed in a key that "
                  "alters numerics or data order.")
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Call jax.distributed.initialize(): 'auto' does when coordinator flags are "
                  "given or a TPU pod / SLURM job with several hosts is detected.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-host: a process that sends no heartbeat "
                     "for this long is declared dead and every other process exits non-zero "
                     "(lower it so a lost host ends the job quickly instead of hanging it).")
flags.DEFINE_integer("initialization_timeout_s", 300, "Multi-host: how long to wait for every "
                     "process to join at start-up.")
flags.DEFINE_bool("verbose_errors", False, "Show full tracebacks for configuration errors.")
flags.DEFINE_integer("wait_for_workdir_s", 0, "When another live run holds the workdir's lock, "
                     "wait up to this many seconds for it to end (a re-queued job whose "
                     "predecessor is still saving) instead of failing at once.")


def _existing() -> dict[str, str]:
  return {n: p for n, p in EXPERIMENTS.items() if os.path.exists(os.path.join(ROOT, p))}


def _load_module(name: str):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  return importlib.import_module(f"experiments.{name}")


def list_experiments() -> str:
  """Every experiment with its presets and the question it answers."""
  lines = []
  for name in _existing():
    module = _load_module(name)
    purpose = (module.__doc__ or "").strip().splitlines()[0]
    lines.append(f"{name}: {purpose}")
    lines += [f"    :{preset:<10} {text}" for preset, text in module.PRESETS.items()]
  return "\n".join(lines)


def _config_arg(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _name_and_preset(value: str) -> tuple[str, str]:
  path, _, preset = value.partition(":")
  return os.path.splitext(os.path.basename(path))[0], preset


def precheck_config_arg(argv) -> None:
  """Exits with a list of what exists when --config names a missing experiment or preset."""
  value = _config_arg(argv)
  if value is None:
    return
  path = value.partition(":")[0]
  name, preset = _name_and_preset(value)
  known = _existing()
  if name not in known or not os.path.exists(path):
    sys.exit(f"error: unknown experiment {path!r}. Experiments: "
             + ", ".join(f"experiments/{n}.py" for n in known) + " (see --list).")
  module = _load_module(name)
  if preset and preset not in module.PRESETS:
    sys.exit(f"error: experiment {name!r} has no preset {preset!r}. Presets: "
             + ", ".join(module.PRESETS) + f" (use --config={path}:PRESET or no preset).")
  from maskax import runs
  known_keys = runs.flatten(module.get_config(preset).to_dict())
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      if key not in known_keys and not any(k.startswith(key + ".") for k in known_keys):
        leaf = key.split(".")[-1]
        close = [k for k in known_keys if k.split(".")[-1][:3] == leaf[:3]]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        sys.exit(f"error: unknown config key {key!r} for {name}.{hint} "
                 f"All keys: python -c \"import experiments.{name} as m; print(m.get_config())\"")


def maybe_initialize_distributed() -> bool:
  """jax.distributed.initialize() before any other JAX call, when this is a multi-process job.

  'auto' starts it when coordinator flags are given or the environment names several SLURM
  tasks, Open MPI ranks or TPU workers; `--distributed=yes` always does. Flags left unset are
  then filled in by JAX's cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes).
  Returns whether it initialized.
  """
  explicit = FLAGS.coordinator_address is not None or FLAGS.num_processes is not None
  detected = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
              or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
              or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if FLAGS.distributed == "no" or (FLAGS.distributed == "auto" and not (explicit or detected)):
    return False
  import jax
  # CPU processes need a cross-process collectives library (GPU uses NCCL, TPU its ICI/DCN);
  # the option is ignored by other backends.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's preemption service would take SIGTERM for itself; maskax.preemption handles it the
  # same way with or without jax.distributed (see that module).
  jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                             heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s,
                             initialization_timeout=FLAGS.initialization_timeout_s)
  return True


def topology() -> dict[str, int]:
  """What a resume must match: a different split changes reduction order and data sharding."""
  import jax
  return {"process_count": jax.process_count(), "device_count": jax.device_count(),
          # Each process loads its own shard of every batch in-process: no extra worker pool.
          "data_workers": jax.process_count()}


def lock_workdir(workdir: str):
  """The workdir's lock, taken by process 0 for every process (`maskax.workdir_lock`)."""
  import jax
  from maskax import workdir_lock
  return workdir_lock.hold(workdir, wait_s=FLAGS.wait_for_workdir_s,
                           is_holder=jax.process_index() == 0,
                           process_count=jax.process_count())


def run_one(module, config, workdir: str) -> dict:
  """Locks `workdir`, writes (or checks) the resolved config, then runs the experiment."""
  import jax
  from maskax import runs
  runs.check_values(config.to_dict())
  with lock_workdir(workdir):
    runs.write_config(workdir, config.to_dict(), safe=getattr(module, "RESUME_SAFE_KEYS", ()),
                      pinned=getattr(module, "RESUME_PINNED_KEYS", ()),
                      allow_change=FLAGS.allow_config_change,
                      is_writer=jax.process_index() == 0, topology=topology())
    return module.run(config, workdir)


def run_sweep(module, config, workdir: str, spec: str) -> None:
  """One sub-workdir per value of KEY, then results.md/.csv/.png in `workdir`."""
  import jax
  from maskax import progress, report, runs
  key, values = runs.parse_sweep(spec, config.to_dict())
  cells = []
  for value in values:  # every cell's values are checked before the first one trains
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      node = cfg
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
    runs.check_values(cfg.to_dict())
    cells.append((value, cfg, os.path.join(workdir, runs.sweep_dirname(key, value))))
  finals, histories = [], []
  with lock_workdir(workdir):  # the sweep's own files (results.*); each run locks its folder
    for value, cfg, sub in cells:
      logging.info("sweep %s=%r -> %s", key, value, sub)
      finals.append((value, run_one(module, cfg, sub)))
      histories.append((value, progress.read_metrics(sub)))
    if jax.process_index() == 0:
      columns = getattr(module, "REPORT_METRICS", None)
      md, csv_path = report.write_tables(workdir, key, finals, columns)
      png = report.plot_sweep(os.path.join(workdir, "results.png"), key, histories,
                              columns or report.default_metrics(histories))
      with open(md) as f:
        print(f.read())
      print(f"wrote {md}, {csv_path}, {png}")


class _QuietLibraries:
  """Drops INFO lines of orbax and JAX (dozens per checkpoint) so progress lines stay readable."""

  def filter(self, record) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/jax/", "/jaxlib/"))
    return record.levelno >= 30 or not noisy  # 30 = std logging.WARNING (absl numbers differ)


def main(argv):
  # Library records reach the absl handler through several loggers; filter where they all end.
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.list:
    print(list_experiments())
    return 0
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/bert_pretrain.py "
                         "(see --list).")
  maybe_initialize_distributed()
  import jax  # only after distributed init: no JAX call may come before it.
  from maskax import runs
  from maskax.preemption import Preempted

  name, preset = _name_and_preset(_config_arg(sys.argv))
  module = _load_module(name)
  config = FLAGS.config
  if FLAGS.seed is not None:
    config.seed = FLAGS.seed
  workdir = FLAGS.workdir or os.path.join("runs", name, preset or "default")
  logging.info("experiment %s, preset %s, workdir %s, %d device(s) on %d process(es)",
               name, preset or "default", workdir, jax.device_count(), jax.process_count())
  try:
    if FLAGS.sweep:
      run_sweep(module, config, workdir, FLAGS.sweep)
    else:
      print(runs.format_final(run_one(module, config, workdir)))
  except Preempted as e:  # the checkpoint is committed: a clean exit lets the scheduler requeue
    logging.warning("%s", e)
    print(e)
    return 0
  return 0


def run():
  # Check --config before absl parses it, so a typo lists what exists instead of a traceback.
  precheck_config_arg(sys.argv)
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
    if FLAGS.is_parsed() and FLAGS.verbose_errors:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
