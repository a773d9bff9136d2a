"""Preemption: a SIGTERM makes every process save at the same step and exit cleanly.

TPU pods, Kubernetes, SLURM and spot GPU nodes send SIGTERM some seconds to minutes before they
kill a job. A process cannot save from inside a signal handler (it may be in the middle of a
step, and on a pod the other processes must save the same step), so the handler only sets a
flag. Each train step takes the flag of every process as one more input
(`sharding.process_flag`) and returns their OR, computed with the step's own collectives. The
loop reads it one step later, together with the non-finite check, so the host never waits for
the device just for this; every process sees the same answer after the same step, so all of
them save that step and raise `Preempted`, which `launch.py` turns into exit status 0.
Re-running the command resumes from that checkpoint with no step computed twice.

`jax.distributed.initialize` installs a SIGTERM hook of its own (JAX's preemption service);
`launch.py` turns that service off so this handler is the only one, with or without
`jax.distributed`. A SIGTERM that arrives before the loop starts (while data is built or the
step compiles) keeps its default meaning and ends the process: there is nothing to save yet.
"""

from __future__ import annotations

import signal
import threading

from absl import logging


class Preempted(Exception):
  """Training stopped early on a preemption notice; the checkpoint at `step` is committed."""

  def __init__(self, step: int, workdir: str):
    super().__init__(
      f"preempted: stopped at step {step} after saving a checkpoint in "
      f"{workdir}; run the same command again to resume."
    )
    self.step = step
    self.workdir = workdir


class StopSignal:
  """Context manager: while active, SIGTERM (or `signals`) only sets `requested()`.

  Restores the previous handlers on exit. Signal handlers can only be installed from the main
  thread; elsewhere the flag stays False (and the signal keeps its previous meaning).
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._event = threading.Event()
    self._previous: dict = {}

  def requested(self) -> bool:
    return self._event.is_set()

  def _handle(self, signum, frame):
    del frame
    # Only set the flag: logging from a handler can interleave with a log line in progress.
    self._event.set()

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("training outside the main thread: SIGTERM will not trigger a clean save.")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      # None: the previous handler was installed outside Python (e.g. by JAX); the best we can
      # restore is the default action.
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()
