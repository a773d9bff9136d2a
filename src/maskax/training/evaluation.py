"""Evaluation on fixed held-out batches: sums on the devices, one finish on the host.

An experiment gives a function `sums(state, batch) -> {name: value}` over the *global* batch
(the batch array spans every device and process, so a sum inside the jitted function is
already a sum over devices and processes); the `Evaluator` adds the values over batches and
turns them into floats once, on the host. A value is one of
  (total, weight)  scalars: reported as total / weight (0 when the weight is 0), the masked-loss
                   contract of `maskax.masking.losses`;
  Max(x)           reduced with the maximum instead of the sum (a worst case, e.g. the largest
                   change of a prediction); a scalar is reported as is;
  any other array  summed, then read by `finish` (a confusion matrix i32[C, C] -> mean IoU,
                   histograms, per-class pairs).
`finish(sums) -> {name: float}` sees every value as NumPy (Max unwrapped) and may also
replace what a pair or a Max reports.

Several named sets (`{name: batches}`, e.g. one per missing rate) share the function; the
metric `m` of set `s` is reported as `m_s` (eval/mse_miss60), the suffix form the experiments'
metric names already use.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from maskax.training import sharding as sharding_lib
from maskax.data import iterators
from maskax.masking.losses import safe_div

Sums = Mapping[str, Any]
Batches = Iterable[Mapping[str, np.ndarray]]


@flax.struct.dataclass
class Max:
  """A value reduced with the maximum over batches instead of the sum."""

  value: jax.Array


def _is_max(x) -> bool:
  return isinstance(x, Max)


def add(a: Sums | None, b: Sums) -> Sums:
  """Sums of two batches (None = nothing yet): Max entries by maximum, every other leaf by +."""
  if a is None:
    return b
  merge = lambda x, y: Max(jnp.maximum(x.value, y.value)) if _is_max(x) else x + y
  return jax.tree.map(merge, a, b, is_leaf=_is_max)


def _is_scalar_pair(value) -> bool:
  return isinstance(value, tuple) and len(value) == 2 and all(np.ndim(v) == 0 for v in value)


def report(
  sums: Sums, finish: Callable[[Sums], Mapping[str, float]] | None = None
) -> dict[str, float]:
  """Summed values -> `{name: float}` on the host: pairs as total / weight, scalar Max as its
  value, the rest through `finish` (a ValueError names entries nothing reads)."""
  host = jax.device_get(sums)
  out, unread = {}, []
  for name, value in host.items():
    if _is_scalar_pair(value):
      # The loop's own division (`train.sums_to_metrics`): 0 for an empty set, never NaN.
      out[name] = float(safe_div(np.float64(value[0]), np.float64(value[1])))
    elif _is_max(value) and np.ndim(value.value) == 0:
      out[name] = float(value.value)
    else:
      unread.append(name)
  if finish is not None:
    out.update(finish({k: v.value if _is_max(v) else v for k, v in host.items()}))
  elif unread:
    raise ValueError(
      f"evaluation sums {unread} are neither (total, weight) scalar pairs nor a "
      "scalar Max; give the task an eval_finish that turns them into metrics."
    )
  return {k: float(v) for k, v in out.items()}


def fixed_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict]:
  """A held-out split in order, as this process's rows of each global batch of `batch_size`.

  arrays: every entry [N, ...], the same on every process. The last batch is filled by
  repeating the last row and every batch carries `"valid": bool[B_local]`: give the filler rows
  weight 0 (a Max over a repeated row is unchanged).
  """
  return iterators.fixed_batches(
    arrays, batch_size, process_index=jax.process_index(), process_count=jax.process_count()
  )


class Evaluator:
  """`evaluator(state) -> {name: float}`: one pass over every held-out set.

  sums_fn: `(state, batch) -> Sums` (module doc), pure; jitted here once with the state
    replicated and the batch split over the `data` axis (retraced per batch shape only).
  data: `() -> batches` or `() -> {set name: batches}`; batches are process-local like the
    training data (`fixed_batches`). Called once, at the first evaluation: the batches are
    sharded then and stay on the devices, so later evaluations move no data and never sync
    the host before the last batch. Held-out sets are small; one that is not should be
    subsampled, not streamed through this.
  finish: host-side `Sums -> {name: float}` for values that are not pairs or Max, or None.
  """

  def __init__(
    self,
    sums_fn: Callable[[Any, Any], Sums],
    data: Callable[[], Batches | Mapping[str, Batches]],
    mesh,
    *,
    finish: Callable[[Sums], Mapping[str, float]] | None = None,
  ):
    repl = sharding_lib.replicated(mesh)
    self._sums = jax.jit(
      sums_fn, in_shardings=(repl, sharding_lib.batch_sharding(mesh)), out_shardings=repl
    )
    self._data, self._mesh, self._finish = data, mesh, finish
    self._sets: dict[str, list] | None = None

  def _shard(self, name: str, batch) -> Any:
    rows = np.shape(jax.tree.leaves(batch)[0])[0] * jax.process_count()
    if rows % self._mesh.size:
      raise ValueError(
        f"an evaluation batch{f' of set {name!r}' if name else ''} has {rows} rows,"
        f" not a multiple of the {self._mesh.size} devices; make the held-out "
        "batch size a multiple of the device count."
      )
    return sharding_lib.shard_batch(batch, self._mesh)

  def sets(self) -> dict[str, list]:
    """`{set name: sharded batches}` ('' names the only set of a plain list)."""
    if self._sets is None:
      data = self._data()
      data = dict(data) if isinstance(data, Mapping) else {"": data}
      self._sets = {name: [self._shard(name, b) for b in batches] for name, batches in data.items()}
    return self._sets

  def __call__(self, state) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, batches in self.sets().items():
      sums = None
      for batch in batches:
        sums = add(sums, self._sums(state, batch))
      if sums is None:
        raise ValueError(
          f"the evaluation data{f' of set {name!r}' if name else ''} is empty; "
          "check the eval split of the data config."
        )
      suffix = f"_{name}" if name else ""
      metrics.update({k + suffix: v for k, v in report(sums, self._finish).items()})
    return metrics


def train_temp_mb(loss, params, model_state, batch) -> float:
  """Temporary memory (MB) XLA allocates for one gradient of a `Task.loss` on one host batch:
  the objective the train step differentiates, the sum of every term's total / weight."""

  def objective(p):
    terms = loss(p, model_state, batch, jax.random.key(0), train=True)[0]
    return sum(safe_div(total, weight) for total, weight in terms.values())

  compiled = jax.jit(jax.grad(objective)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20
