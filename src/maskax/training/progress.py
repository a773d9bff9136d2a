"""Metrics a program can read (JSON lines), curves to watch (TensorBoard) and progress lines.

Only process 0 writes: on a pod every process runs the same loop, and N copies of each line
would be noise (metrics are already global, computed on the global batch).

Every metric record goes to `WORKDIR/metrics.jsonl` (the record the reports read) and, as
scalars, to TensorBoard event files beside it (`tensorboard --logdir=WORKDIR`, or a sweep's
workdir to see all its runs), written with tensorboardX: it needs neither TensorFlow nor torch.

Throughput is measured here and only here: `Progress.rate` is the run's training steps per
second, with compilation (JAX's own compile-time events) and evaluation left out, and the last
logged `steps_per_s` is the run's throughput, from which experiments derive tokens/s or images/s.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import types
import weakref
from typing import Mapping

import jax
from absl import logging
from jax import monitoring

from maskax.training import paths

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
  if not paths.as_path(path).exists():
    return [], False
  with paths.as_path(path).open() as f:
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
        raise ValueError(
          f"{path}, line {number}, is not valid JSON ({e.msg}); fix or delete "
          "that line, then run again."
        ) from None
      logging.warning(
        "%s: dropped a torn last line (%d characters), as left by a process "
        "killed while writing it.",
        path,
        len(line.rstrip("\n")),
      )
      torn = True
  return records, torn


class MetricWriter:
  """Appends one JSON object per line, `{"step", "time", <metrics>...}`, and writes the same
  metrics as TensorBoard scalars (see the module docstring)."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.active = jax.process_index() == 0
    self._events = None
    # Object stores have no append: for a URL workdir the file's whole text is kept here and
    # every record rewrites the (small) object in one write, which readers see whole or not at
    # all. (GCS takes about one write a second per object; gcsfs retries faster ones with
    # backoff, so only runs that log several times a second pay for it.) None: a local file,
    # appended to.
    self._text: str | None = None
    kept = None
    if self.active and resume_step >= 0:
      kept = self._truncate_after(resume_step)
    if self.active and paths.is_url(workdir):
      kept = _read_records(self.path)[0] if kept is None else kept
      self._text = "".join(json.dumps(r) + "\n" for r in kept)
    if self.active:
      self._events = _open_events(workdir, purge_step=resume_step + 1 if resume_step >= 0 else None)

  def _truncate_after(self, step: int) -> list[dict]:
    # A killed run may have logged steps past its last checkpoint; the resumed run recomputes
    # them, so drop those lines to keep one record per (step, kind).
    # A torn last line is dropped by read_metrics; rewriting then repairs the file.
    records, torn = _read_records(self.path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if torn or len(kept) != len(records):
      # A kill during the rewrite leaves the old file whole.
      paths.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept

  def write(self, step: int, metrics: Mapping[str, float], *, elapsed: float) -> None:
    if not self.active:
      return
    record = {"step": int(step), "time": round(float(elapsed), 4)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    line = json.dumps(record) + "\n"
    if self._text is None:
      with paths.as_path(self.path).open("a") as f:
        f.write(line)
    else:
      self._text += line
      paths.write_text_atomic(self.path, self._text)
    if self._events is not None:
      tbx = _tensorboardx()
      now = time.time()
      for k, v in metrics.items():
        self._events.write_event(
          tbx.Event(wall_time=now, step=int(step), summary=tbx.scalar(k, float(v)))
        )
      self._events.flush()  # a run killed right after a checkpoint keeps its curve up to it

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def _open_events(workdir: str, *, purge_step: int | None):
  """A new event file in `workdir` (tensorboardX's synchronous EventsWriter), or None with a
  warning when tensorboardX is missing: the event files are for watching, metrics.jsonl is the
  record, so their lack stops no run.

  Not tensorboardX's SummaryWriter: it writes from a thread that flushes every `flush_secs`, so
  a run killed a few seconds after a checkpoint lost those steps from TensorBoard for good (the
  resumed run does not log them again). What its `purge_step` writes is written here instead:
  a SessionLog START at `purge_step`, on which TensorBoard drops the events an earlier file
  holds at or after that step, i.e. those a killed run logged past its last checkpoint.
  """
  try:
    tbx = _tensorboardx()
  except ImportError:
    logging.warning(
      "tensorboardX is not installed: no TensorBoard event files in %s "
      "(pip install -r requirements.txt).",
      workdir,
    )
    return None
  # The writer names its file by the second; the suffix keeps a second file in the same second
  # (a quick resume) from overwriting the first, and sorts after it as TensorBoard reads them.
  suffix = f".{time.time_ns()}"
  if paths.is_url(workdir):
    events = _UploadedEvents(tbx, workdir, suffix)
  else:
    events = tbx.EventsWriter(os.path.join(workdir, "events"), suffix)
  if purge_step is not None:
    events.write_event(
      tbx.Event(
        wall_time=time.time(),
        step=purge_step,
        session_log=tbx.SessionLog(status=tbx.SessionLog.START),
      )
    )
  events.flush()
  return events


class _UploadedEvents:
  """An EventsWriter for a URL workdir: it writes a local temporary file, and every flush
  uploads that whole file to the workdir (one object write, through epath).

  Not tensorboardX's own gs:// writer, which also re-uploads its whole buffer at each flush: it
  talks to GCS through google-cloud-storage, with a client and credential lookup of its own.
  Through epath the events use the backend, credentials and start-up check
  (`paths.check_backend`) of every other file in the workdir. Event files of scalars stay small,
  so rewriting one at each log step costs about what rewriting metrics.jsonl does.
  """

  def __init__(self, tbx, workdir: str, suffix: str):
    local_dir = tempfile.mkdtemp(prefix="maskax-events-")
    # MetricWriter is not always closed (a run that raises): the folder goes with the object.
    weakref.finalize(self, shutil.rmtree, local_dir, ignore_errors=True)
    self._writer = tbx.EventsWriter(os.path.join(local_dir, "events"), suffix)
    (name,) = os.listdir(local_dir)  # the writer creates its file at once, named as it likes
    self._local = os.path.join(local_dir, name)
    self._remote = paths.as_path(workdir) / name

  def write_event(self, event) -> None:
    self._writer.write_event(event)

  def flush(self) -> None:
    self._writer.flush()
    with open(self._local, "rb") as f:
      self._remote.write_bytes(f.read())

  def close(self) -> None:
    self.flush()
    self._writer.close()


@functools.cache
def _tensorboardx():
  """The tensorboardX pieces the writer uses, as one namespace."""
  # tensorboardX's package init imports torch when it is installed, only to accept torch
  # tensors: in a JAX process that costs 1.4 s and 180 MB, so torch is hidden while it loads.
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # `import torch` now raises ImportError
  try:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar
  finally:
    if hide_torch and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return types.SimpleNamespace(
    EventsWriter=EventsWriter, Event=Event, SessionLog=SessionLog, scalar=scalar
  )


def _jsonable(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


# Seconds JAX spent tracing, lowering and compiling, per thread (its monitoring events). A
# window of training time subtracts what its own thread compiled, so that neither the first
# step's compilation nor a later recompile (a new padded shape) counts as training, while an
# orbax thread's work does not leak into the loop's numbers.
_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
_compile_s: dict[int, float] = {}
_listening = False


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    thread = threading.get_ident()
    _compile_s[thread] = _compile_s.get(thread, 0.0) + seconds


def compile_seconds() -> float:
  """Seconds this thread has spent compiling since the first call (which starts counting)."""
  global _listening
  if not _listening:
    monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True
  return _compile_s.get(threading.get_ident(), 0.0)


@contextlib.contextmanager
def phase(name: str):
  """Times a start-up phase (tokenizer, data preparation, restoring the state) and logs it.

  `with progress.phase("data"): ...` logs `start-up: data took 3.2 s` on process 0 and adds the
  seconds to `phases()`, which the loop writes into its first metrics record as
  `startup/NAME_s`, so a slow start is visible in metrics.jsonl and TensorBoard, not only in
  the log. Compilation is reported apart, by `Progress.rate`, since it happens inside steps.
  """
  start = time.perf_counter()
  try:
    yield
  finally:
    seconds = time.perf_counter() - start
    _phases[name] = _phases.get(name, 0.0) + seconds
    if jax.process_index() == 0:
      logging.info("start-up: %s took %.1f s", name, seconds)


_phases: dict[str, float] = {}


def phases(*, clear: bool = False) -> dict[str, float]:
  """`{name: seconds}` of the phases timed so far in this process (`clear` starts over: one run
  of a sweep must not report the phases of the run before it)."""
  out = dict(_phases)
  if clear:
    _phases.clear()
  return out


class Progress:
  """Prints `step i/N | key metrics | steps/s | ETA` at each log step, and measures the speed.

  Training time is the wall time between calls to `rate` less the compilation in it. A window
  in which an evaluation was logged (`log(..., rate=None)`) is left out whole, as its split
  between training and evaluation is unknown; when eval_every is a multiple of log_every the
  loop calls `rate` right before and right after each evaluation, and no training is lost.
  """

  def __init__(self, total_steps: int, start_step: int, *, clock=time.perf_counter):
    self.total = total_steps
    self.clock = clock  # seconds; tests pass a fake one
    self.last_step = start_step
    self.last_time = clock()
    self.last_compile_s = compile_seconds()
    self.evaluated = False  # since the last `rate` call
    self.trained_steps, self.trained_s = 0, 0.0

  def rate(self, step: int) -> float:
    """Training steps per second so far in this process (NaN until a window counts); called
    at each log step and after each evaluation."""
    now, compiled = self.clock(), compile_seconds()
    steps, compile_s = step - self.last_step, compiled - self.last_compile_s
    seconds = now - self.last_time - compile_s
    if steps > 0 and not self.evaluated and seconds > 0:
      self.trained_steps += steps
      self.trained_s += seconds
    if compile_s >= 0.2 and jax.process_index() == 0:  # below that: small host-side helpers
      logging.info("compilation: %.1f s (not counted in steps/s or ETA)", compile_s)
    self.last_step, self.last_time, self.last_compile_s = step, now, compiled
    self.evaluated = False
    return self.trained_steps / self.trained_s if self.trained_s > 0 else math.nan

  def line(self, step: int, metrics: Mapping[str, float], rate: float | None) -> str:
    """`rate=None` for evaluation lines, which have no speed or ETA."""
    shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
    if rate is None:
      return f"step {step}/{self.total}  {shown}"
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    speed = f"{rate:.2f}" if math.isfinite(rate) else "?"
    return f"step {step}/{self.total}  {shown}  {speed} steps/s  ETA {format_duration(eta)}"

  def log(self, step: int, metrics: Mapping[str, float], rate: float | None) -> None:
    if rate is None:
      self.evaluated = True
    if jax.process_index() == 0:
      logging.info("%s", self.line(step, metrics, rate))


def _fmt(v: float) -> str:
  return f"{v:.4g}"


def format_duration(seconds: float) -> str:
  """`1:02:03`, `2:03`, or `?` when unknown (not finite)."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
