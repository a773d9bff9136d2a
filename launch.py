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

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from maskax.launcher import discovery

ROOT = os.path.dirname(os.path.realpath(__file__))  # experiments/ and relative --config paths

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
  "Run folder (default runs/NAME/PRESET), or a gs://BUCKET/PATH URL (needs gcsfs): "
  "config, metrics, checkpoints, sweep results. Re-running resumes from it.",
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
    print(discovery.list_experiments(ROOT))
    return 0
  if FLAGS.config is None:
    raise app.UsageError(
      "--config is required, e.g. --config=experiments/bert_pretrain.py (see --list)."
    )
  maybe_initialize_distributed()
  import jax  # only after distributed init: no JAX call may come before it.
  from maskax.launcher import runner
  from maskax.training import runs
  from maskax.training.preemption import Preempted

  path, _, preset = discovery.config_arg(sys.argv).partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  module = discovery.load_experiment(path, ROOT)
  config = FLAGS.config
  sweeping = bool(FLAGS.sweep or FLAGS.seeds)
  if FLAGS.baseline and not sweeping:
    raise app.UsageError("--baseline names a cell of a sweep: add --sweep or --seeds.")
  if FLAGS.seed is not None:
    if FLAGS.seeds or any(s.startswith("seed=") for s in FLAGS.sweep or []):
      raise app.UsageError("--seed sets one seed, --seeds/--sweep=seed=... several: use one.")
    config.seed = FLAGS.seed
  options = runner.Options(
    allow_config_change=FLAGS.allow_config_change,
    wait_for_workdir_s=FLAGS.wait_for_workdir_s,
    sweep=tuple(FLAGS.sweep or ()),
    seeds=FLAGS.seeds,
    baseline=FLAGS.baseline,
    predict=FLAGS.predict,
    predict_out=FLAGS.predict_out,
    export=FLAGS.export,
  )
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
    return runner.use_trained(module, name, config, workdir, options) or 0
  try:
    if sweeping:
      runner.run_sweep(module, config, workdir, options)
    else:
      print(runs.format_final(runner.run_one(module, config, workdir, options)))
  except Preempted as e:  # the checkpoint is committed: a clean exit lets the scheduler requeue
    logging.warning("%s", e)
    print(e)
    return 0
  return 0


def run():
  # Check --config before absl parses it, so a typo lists what exists instead of a traceback.
  sys.argv[:] = discovery.precheck_config_arg(sys.argv, ROOT)
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
    if FLAGS.is_parsed() and FLAGS.verbose_errors:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
