"""The generic training loop every experiment calls: an experiment says *what*, this says *how*.

An experiment hands over a `Task` (init, loss, optimizer, data) and `LoopOptions`; `train`
creates the state on the mesh (or restores it from the workdir), runs the jitted `train_step`,
evaluates, logs, checkpoints, and returns the final state and metrics.

The loss contract: `task.loss` returns `terms`, a dict `name -> (total, weight)`, computed over
the *global* batch (the batch array spans every device). The objective is
`sum_k safe_div(total_k, weight_k)`: one division per term, after every sum. With gradient
accumulation the weights of the whole batch are only known after the last micro-batch, so each
term's gradient is accumulated separately (`jax.jacrev` over the term totals) and divided once
at the end; that is what keeps accumulation equal to one big batch for every normalisation
(the transformers#24725 bug class).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from maskax.training import checkpoint as ckpt_lib
from maskax.training import preemption
from maskax.training import progress as progress_lib
from maskax.training import runs
from maskax.training import sharding as sharding_lib
from maskax.masking.losses import safe_div
from maskax.training.preemption import Preempted  # noqa: F401  (re-exported: train.Preempted)
from maskax.training.train_step import make_eval_step, make_train_step

Pairs = Mapping[str, tuple[jax.Array, jax.Array]]


class DataIterator(Protocol):
  """Process-local batches (dicts of NumPy arrays) with a resumable position."""

  def __next__(self) -> dict: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]: number of updates applied so far.
  params: Any
  opt_state: Any
  model_state: Any  # batch-norm statistics, carried RNN state, ... ({} when none).
  key: jax.Array  # u32[2]: per-step keys are fold_in(key, step).


@dataclasses.dataclass(frozen=True)
class Task:
  """What to train.

  init:  key -> (params, model_state).
  loss:  (params, model_state, batch, key, *, train) -> (terms, metrics, new_model_state), where
         terms and metrics are dicts `name -> (total, weight)` over the global batch; terms are
         optimised (and logged), metrics only logged. Both are averaged over a log interval or
         an eval pass as sum(total) / sum(weight).
  eval_data: () -> fixed held-out batches (process-local, like train_data;
         `evaluation.fixed_batches`), or {set name: batches}: metric m of set s is logged as
         `eval/m_s`. Called once; the batches are sharded then and kept on the devices.
  eval_sums: (params, model_state, batch, key) -> {name: sums} over the global batch, jitted
         once: (total, weight) pairs, `evaluation.Max`, or any array summed over batches,
         devices and processes (a confusion matrix). None: the pairs of `loss(train=False)`.
  eval_finish: host-side {name: summed NumPy value} -> {name: float}, for sums that are not
         pairs or Max (mean IoU from a confusion matrix); see `maskax.training.evaluation`.
  extra_eval: state -> dict of floats, called at every evaluation, for what is no sum over a
         fixed batch: sampled text, a decoder's search (BLEU), constants such as a baseline.
  """

  init: Callable[[jax.Array], tuple[Any, Any]]
  loss: Callable[..., tuple[Pairs, Pairs, Any]]
  optimizer: optax.GradientTransformation
  train_data: DataIterator
  eval_data: Callable[[], Iterable[dict] | Mapping[str, Iterable[dict]]] | None = None
  eval_sums: Callable[..., Mapping[str, Any]] | None = None
  eval_finish: Callable[[Mapping[str, Any]], Mapping[str, float]] | None = None
  # Kept because sampling text (char_rnn) and beam search (seq2seq) loop over their own outputs
  # on the host: they are no sum over a fixed batch that `eval_sums` could express.
  extra_eval: Callable[[TrainState], Mapping[str, float]] | None = None


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """How to train; experiments fill it from `config.train` with `from_config`."""

  steps: int
  log_every: int = 50
  eval_every: int = 0  # 0: evaluate only at the end.
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  grad_accum_steps: int = 1
  on_nonfinite: str = "stop"  # 'stop' after max_nonfinite_steps bad steps, or 'skip' them all.
  max_nonfinite_steps: int = 1
  async_checkpoints: bool = True

  def __post_init__(self):
    for name in (
      "steps",
      "log_every",
      "checkpoint_every",
      "keep_checkpoints",
      "grad_accum_steps",
      "max_nonfinite_steps",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name}={getattr(self, name)} must be positive.")
    if self.eval_every < 0:
      raise ValueError(f"train.eval_every={self.eval_every} must be >= 0.")
    if self.on_nonfinite not in ("stop", "skip"):
      raise ValueError(f"train.on_nonfinite={self.on_nonfinite!r}: use 'stop' or 'skip'.")

  @classmethod
  def from_config(cls, train_config: Mapping[str, Any]) -> "LoopOptions":
    """Takes the loop's fields from `config.train` (other keys there belong to the experiment)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: train_config[n] for n in names if n in train_config})


class NonFiniteError(RuntimeError):
  """Too many steps had a non-finite loss, gradient or update."""


def sums_to_metrics(sums: Pairs, prefix: str = "") -> dict[str, float]:
  """`{name: (total, weight)}` -> `{prefix + name: total / weight}` on the host (0 if weight 0)."""
  host = jax.device_get(sums)
  return {prefix + k: float(safe_div(np.float64(t), np.float64(w))) for k, (t, w) in host.items()}


def _add(a, b):
  return b if a is None else jax.tree.map(jnp.add, a, b)


def _sums_to_json(sums) -> dict | None:
  """`{name: (total, weight)}` of device scalars -> `{name: [[value, dtype], [value, dtype]]}`."""
  if sums is None:
    return None
  return {
    k: [[np.asarray(x).item(), np.asarray(x).dtype.name] for x in pair]
    for k, pair in jax.device_get(sums).items()
  }


def _sums_from_json(saved) -> dict | None:
  if not saved:  # None, or a checkpoint written before log sums were saved
    return None
  return {k: tuple(np.asarray(v, dtype=jnp.dtype(d)) for v, d in pair) for k, pair in saved.items()}


def evaluate(task: Task, state: TrainState, eval_step, mesh) -> dict[str, float]:
  """`eval_step(state)` (the task's `evaluation.Evaluator` from `make_eval_step`, None without
  eval data) plus `task.extra_eval`, as `eval/<name>` floats."""
  del mesh  # the evaluator holds it
  metrics: dict[str, float] = {}
  if eval_step is not None:
    metrics.update({"eval/" + k: v for k, v in eval_step(state).items()})
  if task.extra_eval is not None:
    metrics.update({"eval/" + k: float(v) for k, v in task.extra_eval(state).items()})
  return metrics


def init_state(task: Task, key: jax.Array) -> TrainState:
  """A fresh TrainState at step 0: `task.init` and the optimizer on one half of `key`, the
  per-step keys from the other. Pure; jit it with the output sharding you want."""
  init_key, loop_key = jax.random.split(key)
  params, model_state = task.init(init_key)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=task.optimizer.init(params),
    model_state=model_state,
    key=loop_key,
  )


def init_or_restore(task: Task, seed: int, mesh, checkpointer):
  """Fresh state (placed on the mesh) or the newest intact checkpoint's state, data and loop
  record (a damaged newer checkpoint is skipped with a warning; see `Checkpointer`)."""
  repl = sharding_lib.replicated(mesh)
  init_state_fn = functools.partial(init_state, task)
  # The state holds the key's raw u32[2] data: orbax saves plain arrays, and the bits equal the
  # legacy PRNGKey(seed)'s (threefry), so runs started before this change resume bitwise.
  key = jax.random.key_data(jax.random.key(seed))
  if checkpointer.latest_step() is not None:
    abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
      jax.eval_shape(init_state_fn, key),
    )
    any_process = sharding_lib.make_any_process(mesh)
    restored = checkpointer.restore_latest(
      abstract, agree=lambda bad: bool(jax.device_get(any_process(bad)))
    )
    if restored is not None:
      return restored
  init = jax.jit(init_state_fn, out_shardings=repl)
  return init(key), None, {"elapsed": 0.0, "nonfinite_steps": []}


def _last_training_record(workdir: str) -> dict[str, float]:
  """The training metrics of the last log step in `workdir/metrics.jsonl` (those without
  `eval/`), so that re-running a finished run reports its training loss again."""
  for record in reversed(progress_lib.read_metrics(workdir)):
    if "loss" in record:
      return {k: v for k, v in record.items() if k not in ("step", "time")}
  return {}


def train(
  task: Task, options: LoopOptions, workdir: str, *, seed: int, mesh=None
) -> tuple[TrainState, dict[str, float]]:
  """Trains to `options.steps`, resuming from `workdir` if it holds a checkpoint.

  On SIGTERM every process saves the same step and `Preempted` is raised (see
  `maskax.training.preemption`); calling `train` again resumes from that step.
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    every=options.checkpoint_every,
    keep=options.keep_checkpoints,
    async_save=options.async_checkpoints,
  )
  try:
    with preemption.StopSignal() as stop_signal:
      return _run(task, options, workdir, seed, mesh, checkpointer, stop_signal)
  finally:
    checkpointer.close()  # orbax drops an in-flight async save at exit unless we wait.


def _run(task, options, workdir, seed, mesh, checkpointer, stop_signal):
  with progress_lib.phase("restore" if checkpointer.latest_step() is not None else "init"):
    state, data_state, loop = init_or_restore(task, seed, mesh, checkpointer)
  # Every checkpoint carries the run's resolved config and topology (what the launcher wrote
  # to the workdir), so a resume can be checked against the checkpoint itself even when
  # config.json was deleted or edited (`runs.write_config`).
  loop.update(runs.read_run_record(workdir))
  if data_state is not None:
    task.train_data.set_state(data_state)
  step = int(jax.device_get(state.step))
  if step:
    logging.info("resumed at step %d from %s", step, workdir)
  train_step = make_train_step(task, options, mesh, stop_vote=True)
  eval_step = make_eval_step(task, mesh)
  stop_flags = {flag: sharding_lib.process_flag(flag, mesh) for flag in (False, True)}
  writer = progress_lib.MetricWriter(workdir, resume_step=step)
  progress = progress_lib.Progress(options.steps, step)
  final: dict[str, float] = {}
  sums, pending, stop = _sums_from_json(loop.get("log_sums")), None, False
  started = time.perf_counter() - loop["elapsed"]

  def check(pending_step, finite, stop_vote) -> bool:
    """Raises on too many non-finite steps; returns whether some process asked to stop."""
    # Fetching last step's flags after the next step is dispatched keeps the device busy.
    finite, stop_vote = jax.device_get((finite, stop_vote))
    if not finite:
      loop["nonfinite_steps"].append(pending_step)
      logging.warning(
        "step %d: non-finite loss, gradient or update; the update was skipped "
        "and the parameters and optimizer state left unchanged.",
        pending_step,
      )
      if (
        options.on_nonfinite == "stop"
        and len(loop["nonfinite_steps"]) >= options.max_nonfinite_steps
      ):
        raise NonFiniteError(
          f"non-finite loss, gradient or update at step(s) {loop['nonfinite_steps']}: those"
          " updates were skipped, so the parameters, optimizer state and every checkpoint stay"
          " finite; stopping after"
          f" train.max_nonfinite_steps={options.max_nonfinite_steps}. Inspect the data and"
          " train.learning_rate at that step, or pass --config.train.on_nonfinite=skip."
        )
    return bool(stop_vote)

  while step < options.steps:
    batch = sharding_lib.shard_batch(next(task.train_data), mesh)
    # out["stop"]: some process got SIGTERM. All read it after the same step, so all stop there.
    state, out = train_step(state, batch, stop_flags[stop_signal.requested()])
    step += 1
    if pending is not None:
      stop |= check(*pending)
    pending = (step, out["finite"], out["stop"])
    sums = _add(sums, out["sums"])
    if step % options.log_every == 0 or step == options.steps:
      stop |= check(*pending)
      pending = None
      final = sums_to_metrics(sums)
      sums = None
      rate = progress.rate(step)
      final["steps_per_s"] = rate
      # The start-up phases (data, tokenizer, init) go into the first record this process writes.
      startup = {f"startup/{k}_s": v for k, v in progress_lib.phases(clear=True).items()}
      writer.write(step, {**final, **startup}, elapsed=time.perf_counter() - started)
      progress.log(step, {k: v for k, v in final.items() if k != "steps_per_s"}, rate)
    if (options.eval_every and step % options.eval_every == 0) or step == options.steps:
      evals = evaluate(task, state, eval_step, mesh)
      if evals:
        writer.write(step, evals, elapsed=time.perf_counter() - started)
        progress.log(step, evals, None)
        final.update(evals)
      progress.rate(step)  # evaluation time is not training speed
    loop["elapsed"] = time.perf_counter() - started
    force = stop or step == options.steps
    if checkpointer.due(step, force=force):
      # The open log interval travels with the checkpoint, so that a resumed run logs the
      # same averages as an uninterrupted one.
      loop["log_sums"] = _sums_to_json(sums)
      checkpointer.save(step, state, task.train_data.get_state(), loop, force=force)
    if stop and step < options.steps:
      logging.warning("preemption notice (SIGTERM): saved step %d, stopping.", step)
      raise preemption.Preempted(step, workdir)
  if not final:  # resumed a finished run: report its last training metrics and evaluation
    final = {**_last_training_record(workdir), **evaluate(task, state, eval_step, mesh)}
  return state, final
