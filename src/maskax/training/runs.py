"""Workdir bookkeeping for launched runs: the resolved config, resume checks, value checks.

Plain dicts in, plain dicts out (the launcher converts its ConfigDict with `to_dict()`), so the
library stays free of flags and ConfigDicts.

The config a resume is checked against is the one saved *inside* the newest readable checkpoint
(`read_run_record` puts it in the loop item at every save); `config.json` is only the copy a
person reads, and the fallback for checkpoints written before the config travelled with them.
Deleting or editing `config.json` therefore cannot make a changed run resume silently.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

from absl import logging

from maskax.training import paths

CONFIG_FILE = "config.json"
TOPOLOGY_FILE = "topology.json"

# Keys that may change between a run and its resume: they decide how long and how often, not
# what is computed. Experiments add their own (generation options, ...) via RESUME_SAFE_KEYS.
RESUME_SAFE_KEYS = (
  "train.steps",
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoints",
)


class ConfigChangedError(ValueError):
  """A resume with a config that alters numerics or data order."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{'a': {'b': 1}}` -> `{'a.b': 1}`."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def _jsonify(value):
  return json.loads(json.dumps(value, default=str))


def config_diff(
  old: Mapping[str, Any],
  new: Mapping[str, Any],
  safe: Iterable[str] = (),
  pinned: Iterable[str] = (),
) -> list[str]:
  """Lines `key: old -> new` for every key that differs, except keys in or under `safe`.

  `pinned` takes keys back out of the default safe set: an experiment whose learning-rate
  schedule is a function of `train.steps` pins it, since extending such a run mid-way changes
  the schedule of the steps already taken.
  """
  safe = tuple(k for k in RESUME_SAFE_KEYS if k not in tuple(pinned)) + tuple(safe)
  old_f, new_f = flatten(_jsonify(old)), flatten(_jsonify(new))
  lines = []
  for key in sorted(set(old_f) | set(new_f)):
    if any(key == s or key.startswith(s + ".") for s in safe):
      continue
    a, b = old_f.get(key, "<absent>"), new_f.get(key, "<absent>")
    if json.dumps(a) != json.dumps(b):  # by text, so that NaN equals NaN
      lines.append(f"  {key}: {a!r} -> {b!r}")
  return lines


def read_run_record(workdir: str) -> dict[str, Any]:
  """`{"config": ..., "topology": ...}` as the launcher wrote them to `workdir` (keys absent
  when the files are: a run started from Python without the launcher)."""
  record = {}
  for key, name in (("config", CONFIG_FILE), ("topology", TOPOLOGY_FILE)):
    value = _read_json(os.path.join(workdir, name))
    if value is not None:
      record[key] = value
  return record


def checkpoint_run_record(workdir: str) -> tuple[dict[str, Any], int] | None:
  """The run record saved in the newest checkpoint that has a verified one, and its step."""
  from maskax.training import (
    checkpoint as ckpt_lib,
  )  # orbax: only when there is a checkpoint to read

  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), every=1, keep=1, reader=True
  )
  try:
    for step in reversed(checkpointer.all_steps()):
      try:
        loop = checkpointer.read_loop(step)
      except (ckpt_lib.CorruptCheckpointError, ckpt_lib.CheckpointReadError):
        continue  # the resume itself reports damage and read errors
      if isinstance(loop, dict) and "config" in loop:
        return {k: loop[k] for k in ("config", "topology") if k in loop}, step
    return None
  finally:
    checkpointer.close()


def has_checkpoint(workdir: str) -> bool:
  return bool(paths.committed_steps(os.path.join(workdir, "checkpoints")))


def _read_json(path: str) -> Any:
  path = paths.as_path(path)
  if not path.exists():
    return None
  with path.open() as f:
    return json.load(f)


def _write_json_atomic(path: str, value: Any) -> None:
  # Other processes of a multi-host job read this file while process 0 rewrites it: they must
  # see the old or the new text, never half of it.
  paths.write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def write_config(
  workdir: str,
  config: Mapping[str, Any],
  *,
  safe: Iterable[str] = (),
  pinned: Iterable[str] = (),
  allow_change: bool = False,
  is_writer: bool = True,
  topology: Mapping[str, Any] | None = None,
  free_topology: Iterable[str] = (),
) -> None:
  """Writes `workdir/config.json` (and `topology.json`); on resume, first checks them.

  `topology` is e.g. `{"process_count": 2, "device_count": 8, "data_workers": 2}`: a resume on
  a different process or device count changes reduction order and data sharding, so it is
  pinned like a numerics key. Raises ConfigChangedError with the differing keys when a run with
  checkpoints is resumed under a config or topology that changes numerics or data order
  (unless `allow_change`). `free_topology` names topology keys a resume may change: an
  experiment whose data stream does not depend on the process count (BERT's prepared shards)
  frees them, and the change is logged instead (sums then reduce in another order, so the run
  continues to rounding, not bitwise). Only the process with `is_writer` writes; every process
  checks.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  topo_path = os.path.join(workdir, TOPOLOGY_FILE)
  if has_checkpoint(workdir):
    saved = checkpoint_run_record(workdir)
    if saved is not None:
      stored, source = saved[0], f"the config saved in checkpoint {saved[1]}"
    else:  # checkpoints from before the config was saved in them
      stored, source = read_run_record(workdir), CONFIG_FILE
    diff = []
    if "config" in stored:
      diff = config_diff(stored["config"], config, safe, pinned)
    # No stored topology: written before pinning.
    if topology is not None and stored.get("topology") is not None:
      free = set(free_topology)
      old, new = stored["topology"], dict(topology)
      moved = [k for k in free if k in old and old[k] != new.get(k)]
      if moved and is_writer:
        logging.warning(
          "resuming with another topology (%s): this experiment's data do not depend on it",
          ", ".join(f"{k} {old[k]} -> {new.get(k)}" for k in sorted(moved)),
        )
      keep = lambda t: {k: v for k, v in t.items() if k not in free}
      diff += config_diff({"topology": keep(old)}, {"topology": keep(new)}, ())
    if diff and not allow_change:
      raise ConfigChangedError(
        f"{workdir} holds a run with a different config ({source}); resuming would mix two"
        " experiments:\n"
        + "\n".join(diff)
        + "\nUse a new --workdir, restore those values, or pass --allow_config_change."
      )
  if is_writer:
    try:
      paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
      _write_json_atomic(path, _jsonify(config))
      if topology is not None:
        _write_json_atomic(topo_path, _jsonify(topology))
    except OSError as e:
      raise PermissionError(
        f"cannot write to workdir {workdir!r} ({e.strerror}); pick a writable --workdir."
      ) from None


def _positive_finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# Values that no experiment can train with, checked before anything is built so that the error
# names the config key (not an optax or data argument deep inside). key -> (test, requirement).
_VALUE_RULES = {
  "train.learning_rate": (_positive_finite, "a finite number > 0"),
  "train.steps": (
    _non_negative_int,
    "an integer > 0 (0 only where the experiment derives "
    "it, e.g. char_rnn from train.tokens_budget)",
  ),
  "train.warmup_steps": (_non_negative_int, "an integer >= 0"),
  "train.weight_decay": (lambda v: _positive_finite(v) or v == 0, "a finite number >= 0"),
  "train.grad_clip": (lambda v: _positive_finite(v) or v == 0, "a finite number >= 0 (0: none)"),
}


def check_workdir(workdir: str) -> None:
  """Raises a one-line ValueError for a workdir maskax cannot use, before anything is written.

  A local path or a `gs://` URL is fine; a URL whose backend is not installed (gcsfs) or whose
  scheme maskax cannot checkpoint to would otherwise fail at the first file written, or worse,
  at the first checkpoint after minutes of training (`maskax.training.paths.check_backend`).
  """
  paths.check_backend(workdir, "--workdir")


def check_values(config: Mapping[str, Any]) -> None:
  """Raises a ValueError naming the key for a config value no run can use (a NaN, infinite or
  non-positive learning rate, negative steps, a batch of no rows, ...)."""
  flat = flatten(config)
  for key, (ok, requirement) in _VALUE_RULES.items():
    if key in flat and not ok(flat[key]):
      raise ValueError(f"{key}={flat[key]!r} must be {requirement}; set --config.{key}=VALUE.")
  batch = flat.get("train.batch_size")
  if batch is not None and not (batch > 0 or flat.get("train.batch_chars", 0) > 0):
    raise ValueError(
      f"train.batch_size={batch!r} must be a positive integer (rows per global "
      "batch); set --config.train.batch_size=VALUE."
    )


def format_final(metrics: Mapping[str, float]) -> str:
  """The last lines a run prints: its final metrics, one per line."""
  lines = ["final metrics:"]
  lines += [
    f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in sorted(metrics.items())
  ]
  return "\n".join(lines)
