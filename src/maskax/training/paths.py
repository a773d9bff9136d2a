"""Workdir paths: a local folder or an object-store URL (`gs://bucket/run`), through one layer.

Every file a run keeps in its workdir is read and written through `etils.epath` (`as_path`),
the path layer orbax itself uses, so a `gs://` workdir needs no mounted bucket. Local paths keep
their exact behaviour: epath hands them to `os` and `open`. Names are still joined with
`os.path.join`, which on POSIX is a plain `/` join and so also right for URLs; only
`os.path.abspath` (which would turn `gs://b` into `$PWD/gs:/b`) goes through `absolute`.

What an object store lacks, and what stands in for it here:
  append          there is none: `metrics.jsonl` is rewritten whole at each record
                  (`progress.MetricWriter`);
  atomic rename   a single write of an object is atomic on GCS and S3 (readers see the old or the
                  new object, never half of one), so `write_text_atomic` writes the object once
                  instead of a tmp file and a rename;
  file locks      none: a URL workdir is not locked (`workdir_lock`, with a warning).

Which URLs work is decided at start by `check_backend`: epath must have a backend for the
scheme, and orbax must be able to write checkpoint arrays there (it does that through
tensorstore's own drivers, not epath).
"""

from __future__ import annotations

import importlib.util
import os
import re

from etils import epath

# Schemes a workdir may use -> the package epath's fsspec backend needs for it.
_FSSPEC_PACKAGES = {"gs": "gcsfs"}
# Schemes epath could reach but orbax 0.12 cannot write arrays to: tensorstore_utils sends only
# gs:// to a remote tensorstore driver and refuses every other URL as "not absolute" (s3://, az://),
# so a run would train and then die at its first checkpoint.
_NO_CHECKPOINTS = {"s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path: str | os.PathLike) -> str | None:
  """`'gs'` for `gs://bucket/run`; None for a local path."""
  match = _URL.match(os.fspath(path))
  return match[1].lower() if match else None


def is_url(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def as_path(path: str | os.PathLike) -> epath.Path:
  """The epath of a workdir or of a file in it (local or URL)."""
  return epath.Path(path)


def absolute(path: str) -> str:
  """`os.path.abspath` for a local path (orbax needs absolute ones); a URL as it is."""
  return path if is_url(path) else os.path.abspath(path)


def _uses_tensorflow() -> bool:
  # epath's own rule (etils.epath.gpath): with TensorFlow importable, remote paths go through
  # tf.io.gfile unless EPATH_USE_TF says no.
  if os.environ.get("EPATH_USE_TF", "").lower() in ("false", "no", "f", "0"):
    return False
  return importlib.util.find_spec("tensorflow") is not None


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ValueError:  # a module in sys.modules without a spec: present, however it got there
    return True


def check_backend(path: str, flag: str = "--workdir") -> None:
  """Raises a one-line ValueError when `path` is a URL that no installed backend can write,
  before anything is written; a local path always passes."""
  name = scheme(path)
  if name is None:
    return
  if name in _NO_CHECKPOINTS:
    raise ValueError(
      f"{flag}={path}: {name}:// workdirs are not supported: orbax writes checkpoint arrays "
      "only to local paths and gs://; mount the bucket and pass the mounted path."
    )
  if name not in _FSSPEC_PACKAGES:
    known = ", ".join(f"{s}://" for s in _FSSPEC_PACKAGES)
    raise ValueError(
      f"{flag}={path}: unknown scheme {name}:// (workdirs may be local paths or {known}); "
      "mount the storage and pass the mounted path."
    )
  if name == "gs" and _uses_tensorflow():
    return  # tf.io.gfile speaks gs:// itself
  package = _FSSPEC_PACKAGES[name]
  if not _installed(package):
    raise ValueError(
      f"{flag}={path}: {name}:// workdirs need the {package} package (pip install {package})."
    )


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader (another process of the job, a resume after a
  kill) sees the old content or the new, never half of it."""
  if is_url(path):
    as_path(path).write_text(text)  # one object write: atomic on GCS and S3
    return
  tmp = f"{path}.tmp{os.getpid()}"
  as_path(tmp).write_text(text)
  os.replace(tmp, path)  # atomic on POSIX


def append_text(path: str, text: str) -> None:
  """Appends `text` to `path`; on an object store (no append) the whole object is read and
  written again, so this is for small, rarely written files (a run's text samples)."""
  path = as_path(path)
  if is_url(path):
    text = (path.read_text() if path.exists() else "") + text
    path.write_text(text)
    return
  with path.open("a") as f:
    f.write(text)


# What orbax writes last into a step folder on an object store, where it cannot rename a
# temporary folder into place (orbax's atomicity_types.COMMIT_SUCCESS_FILE).
COMMIT_SUCCESS_FILE = "commit_success.txt"


def committed_steps(checkpoint_dir: str) -> list[int]:
  """The steps of `checkpoint_dir` that orbax finished writing, in order.

  Locally orbax writes a step into a temporary folder and renames it, so every folder named by
  a number is whole. On an object store it writes into the step's folder directly and adds
  COMMIT_SUCCESS_FILE last: a save killed half-way leaves a numbered folder without it, which
  must not count as the newest checkpoint (orbax itself skips it).
  """
  path = as_path(checkpoint_dir)
  if not path.is_dir():
    return []
  steps = [p for p in path.iterdir() if p.name.isdigit()]
  if is_url(checkpoint_dir):
    steps = [p for p in steps if (p / COMMIT_SUCCESS_FILE).exists()]
  return sorted(int(p.name) for p in steps)
