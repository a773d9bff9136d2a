"""One run per workdir: an exclusive lock held for the whole run, released on exit and on kill.

Two launches into one workdir would append the same metrics twice, race on orbax's files and,
with two configs, leave `config.json` and the checkpoints disagreeing. So the launcher holds
`WORKDIR/run.lock` with `flock(2)` from before it reads the config until the process ends.
The kernel drops a `flock` when its holder exits for any reason (SIGKILL and OOM included), so
a lock left by a dead process is never in the way: the file stays, naming its last holder,
but it is unlocked and the next launch takes it (and says whose it was).

The file holds the holder's pid, host, start time and command line, so a refused launch can say
who is using the workdir. A job re-queued while its predecessor is still saving can wait for
the lock for a bounded time (`wait_s`). On a pod only process 0 takes the lock; the launcher
tells the other processes whether it got it (`hold`).

Limits: `flock` needs a local or NFS file system; on one that has no locks (some FUSE mounts)
the run goes on with a warning. Object-store workdirs (`gs://`) have no locks and are not locked
here either: the run says so in a warning, and keeping one run per such workdir is up to the
scheduler (one job per workdir).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

from maskax.training import paths

LOCK_FILE = "run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


def _describe(holder: dict) -> str:
  if not holder:
    return "another process (it has not written its name yet)"
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
  return (
    f"pid {holder.get('pid')} on host {holder.get('host')} since {started}"
    f" ({holder.get('command', '?')})"
  )


class WorkdirLock:
  """Context manager: exclusive lock on `workdir` (created if needed) while inside.

  `wait_s > 0` polls every `poll_s` seconds for up to `wait_s` seconds before giving up.
  Raises WorkdirBusyError naming the holder when the lock stays taken.
  """

  def __init__(self, workdir: str, *, wait_s: float = 0.0, poll_s: float = 1.0):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.wait_s = float(wait_s)
    self.poll_s = float(poll_s)
    self._fd: int | None = None

  def read_holder(self) -> dict:
    """The holder record in the lock file ({} when empty or unreadable)."""
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    if paths.is_url(self.workdir):
      # An object store offers no flock; a lock file there could not be released by a kill.
      logging.warning(
        "workdir %s is on an object store, which has no file locks: it is not locked, so"
        " nothing stops a second run from writing into it at the same time.",
        self.workdir,
      )
      return
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise PermissionError(
        f"cannot write to workdir {self.workdir!r} ({e.strerror}); pick a writable --workdir."
      ) from None
    deadline = time.monotonic() + self.wait_s
    waited = False
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        holder = self.read_holder()
        if time.monotonic() >= deadline:
          os.close(fd)
          hint = "" if self.wait_s else " or pass --wait_for_workdir_s=SECONDS to wait for it"
          raise WorkdirBusyError(
            f"workdir {self.workdir} is in use by {_describe(holder)}"
            + (f" (waited {self.wait_s:.0f} s)" if self.wait_s else "")
            + f"; let it finish, choose another --workdir{hint}."
          ) from None
        if not waited:
          logging.warning(
            "workdir %s is in use by %s; waiting up to %.0f s for it.",
            self.workdir,
            _describe(holder),
            self.wait_s,
          )
          waited = True
        time.sleep(self.poll_s)
      except OSError as e:
        if e.errno not in _NO_LOCKS:
          raise
        os.close(fd)
        logging.warning(
          "the file system of %s has no file locks (%s): running without the "
          "one-run-per-workdir guard.",
          self.workdir,
          e.strerror,
        )
        return
    previous = self.read_holder()
    if previous and previous.get("pid") != os.getpid():
      logging.info(
        "took over the workdir lock last held by %s (that process has ended).", _describe(previous)
      )
    holder = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.time(),
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # nobody holds it now; the file itself stays (see module doc)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold(workdir: str, *, wait_s: float, is_holder: bool, process_count: int):
  """Context manager: process `is_holder` holds the lock of `workdir` while inside; every
  process raises WorkdirBusyError when it could not be taken.

  With several processes the outcome travels as one small broadcast, so that no process starts
  training (and waits forever in its first collective) when process 0 was refused.
  """
  lock, error = WorkdirLock(workdir, wait_s=wait_s), None
  if is_holder:
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      error = e
  if process_count > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    busy = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if busy and error is None:
      error = WorkdirBusyError(
        f"workdir {workdir} is in use: process 0 could not lock it (its log names the holder)."
      )
  if error is not None:
    lock.release()
    raise error
  try:
    yield lock
  finally:
    lock.release()
