"""Files a user hands to a trained model: input paths, sequences in .npz or .csv, outputs.

`launch.py --predict` gives one input per line. Experiments that read files resolve the lines
with `expand_paths`, name each output after its input (`output_stems`), read sequences with
`read_sequences` (lengths) or `read_masked` (feature masks) and write `write_npz`. Every input
problem raises a one-line ValueError or FileNotFoundError that names the file and what was
expected, which the launcher prints as `error: ...`.

The two sequence layouts:
- `.npz`: arrays by name, shapes in the readers' docstrings.
- `.csv`: a header line (any names), then one line per time step: the sequence id, then F
  feature values. Lines of a sequence are consecutive and in time order; sequences may differ
  in length (padded here, lengths returned). In `read_masked` an empty cell is a missing value.
"""

from __future__ import annotations

import csv
import os

import numpy as np

SEQUENCE_EXTENSIONS = (".npz", ".csv")


def expand_paths(lines, extensions: tuple[str, ...], *, what: str) -> list[str]:
  """Each line a file or a folder; a folder stands for its files ending in `extensions`
  (sorted by name, not recursive). Raises FileNotFoundError for a missing path and ValueError
  for a file of another type or a folder without any such file."""
  kinds = "/".join(extensions)
  paths = []
  for line in lines:
    path = os.path.expanduser(line.strip())
    if os.path.isdir(path):
      found = sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(extensions)
      )
      if not found:
        raise ValueError(f"{path}: a folder without {what} files ({kinds}).")
      paths += found
    elif os.path.isfile(path):
      if not path.lower().endswith(extensions):
        raise ValueError(f"{path}: unsupported file type; expected {what} files ({kinds}).")
      paths.append(path)
    else:
      raise FileNotFoundError(f"{path}: no such file or folder.")
  return paths


def output_stems(paths) -> list[str]:
  """Each path's file name without its extension; ValueError when two inputs share one, since
  their outputs (`<stem>_...`) would overwrite each other."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  seen = {}
  for path, stem in zip(paths, stems):
    if stem in seen:
      raise ValueError(
        f"{seen[stem]} and {path} would write the same outputs ({stem}_*); "
        "rename one or predict them in two runs."
      )
    seen[stem] = path
  return stems


def write_npz(path: str, **arrays) -> str:
  """Writes `arrays` to `path` (.npz) atomically: a reader never sees half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return path


def _npz(path: str, names: tuple[str, ...], layout: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {n: data[n] for n in data.files}
  except Exception as e:  # np.load fails in many ways (OSError, ValueError, BadZipFile, a .npy)
    raise ValueError(
      f"{path}: not a readable .npz file ({type(e).__name__}); expected {layout}."
    ) from None
  missing = [n for n in names if n not in arrays]
  if missing:
    raise ValueError(
      f"{path}: no array {', '.join(missing)} (it has "
      f"{', '.join(arrays) or 'none'}); expected {layout}."
    )
  return arrays


def _csv(path: str, features: int, *, allow_missing: bool) -> tuple[np.ndarray, np.ndarray]:
  """(values f32[B, T, F] with NaN at missing cells and padding, lengths i32[B])."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  rows = [r for r in rows[1:] if any(cell.strip() for cell in r)]  # the header, blank lines
  if not rows:
    raise ValueError(
      f"{path}: no data lines after the header; expected 'sequence,"
      f"{','.join(f'f{i}' for i in range(features))}' lines."
    )
  order, steps = [], {}
  for number, row in enumerate(rows, 2):
    if len(row) != features + 1:
      raise ValueError(
        f"{path}:{number}: {len(row)} columns; expected the sequence id and "
        f"{features} feature values."
      )
    sid = row[0].strip()
    if sid not in steps:
      steps[sid] = []
      order.append(sid)
    elif order[-1] != sid:
      raise ValueError(
        f"{path}:{number}: sequence {sid!r} continues after another one; "
        "keep the lines of a sequence together, in time order."
      )
    try:
      values = [float(c) if c.strip() else np.nan for c in row[1:]]
    except ValueError:
      raise ValueError(f"{path}:{number}: a feature value is not a number: {row[1:]}") from None
    if not allow_missing and any(np.isnan(values)):
      raise ValueError(
        f"{path}:{number}: a feature value is empty or NaN; every step of a "
        "sequence needs all its features."
      )
    steps[sid].append(values)
  lengths = np.array([len(steps[s]) for s in order], np.int32)
  values = np.full((len(order), int(lengths.max()), features), np.nan, np.float32)
  for b, sid in enumerate(order):
    values[b, : lengths[b]] = steps[sid]
  return values, lengths


def read_sequences(path: str, *, features: int) -> dict[str, np.ndarray]:
  """Padded sequences with lengths: {x f32[B, T, F] (0 past each length), lengths i32[B]}.

  .npz: `x` f32[B, T, F] and `lengths` i32[B] with 1 <= lengths <= T (values past a length are
  ignored). .csv: the module docstring's layout, every cell filled.
  """
  layout = f"x f32[B, T, {features}] and lengths i32[B]"
  if path.lower().endswith(".csv"):
    x, lengths = _csv(path, features, allow_missing=False)
  else:
    arrays = _npz(path, ("x", "lengths"), layout)
    x, lengths = arrays["x"], arrays["lengths"]
    if x.ndim != 3 or x.shape[2] != features or x.shape[0] == 0 or x.shape[1] == 0:
      raise ValueError(f"{path}: x has shape {list(x.shape)}; expected {layout}.")
    if lengths.shape != x.shape[:1] or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(
        f"{path}: lengths is {lengths.dtype}{list(lengths.shape)}; expected "
        f"integers [{x.shape[0]}], one per row of x."
      )
    if lengths.min() < 1 or lengths.max() > x.shape[1]:
      raise ValueError(
        f"{path}: lengths must lie in [1, {x.shape[1]}] (T), got {lengths.min()}..{lengths.max()}."
      )
  valid = np.arange(x.shape[1])[None, :] < lengths[:, None]
  x = np.where(valid[..., None], x, 0.0).astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{path}: x holds NaN or infinite values within the lengths.")
  return {"x": x, "lengths": lengths.astype(np.int32)}


def read_masked(path: str, *, features: int) -> dict[str, np.ndarray]:
  """Values with a feature mask: {values f32[B, T, F] (NaN where missing), mask bool[B, T, F]
  (True = observed), lengths i32[B]}.

  .npz: `values` f32[B, T, F] (entries where the mask is False are ignored and may be NaN) and
  `mask` bool[B, T, F]; lengths are T. .csv: the module docstring's layout, an empty cell is a
  missing value; shorter sequences are padded with missing steps.
  """
  layout = f"values f32[B, T, {features}] and mask bool[B, T, {features}]"
  if path.lower().endswith(".csv"):
    values, lengths = _csv(path, features, allow_missing=True)
    mask = ~np.isnan(values)
  else:
    arrays = _npz(path, ("values", "mask"), layout)
    values, mask = arrays["values"], arrays["mask"]
    if values.ndim != 3 or values.shape[2] != features or 0 in values.shape:
      raise ValueError(f"{path}: values has shape {list(values.shape)}; expected {layout}.")
    if mask.shape != values.shape or mask.dtype != np.bool_:
      raise ValueError(
        f"{path}: mask is {mask.dtype}{list(mask.shape)}; expected "
        f"bool{list(values.shape)}, the shape of values."
      )
    lengths = np.full(values.shape[0], values.shape[1], np.int32)
  if not np.all(np.isfinite(np.where(mask, values, 0.0))):
    raise ValueError(f"{path}: an observed value (mask True) is NaN or infinite.")
  return {
    "values": np.where(mask, values, np.nan).astype(np.float32),
    "mask": mask,
    "lengths": lengths,
  }


def split_held_out(
  n: int, eval_fraction: float, *, seed, what: str
) -> tuple[np.ndarray, np.ndarray]:
  """A seeded split of a user's `n` examples: (train indices, held-out indices).

  The held-out share is round(n * eval_fraction), at least one example; `seed` is anything
  `np.random.default_rng` takes. Raises a ValueError naming `data.eval_fraction` when nothing
  would be left to train on.
  """
  order = np.random.default_rng(seed).permutation(n)
  n_eval = max(1, int(round(n * eval_fraction)))
  if n_eval >= n:
    raise ValueError(
      f"data.eval_fraction={eval_fraction} leaves no training {what} ({n} in all); lower it."
    )
  return order[n_eval:], order[:n_eval]
